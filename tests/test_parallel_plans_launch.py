"""Plans for N devices, their validation against model shapes, and the launcher's pure (cmd, env) builder."""

from __future__ import annotations

import pytest

from hf_adaptive.parallel.launch import LaunchConfig, build_launch, check_devices
from hf_adaptive.parallel.plans import (
    ModelDims,
    ParallelPlan,
    all_plans,
    factorizations,
    fitting_tp_sizes,
    plan_for_strategy,
    validate_plan,
)

SMOLLM2 = ModelDims(num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536)
QWEN_1_5B = ModelDims(num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960)
TINY = ModelDims(num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


def test_plan_layout_roundtrip():
    """Guards the rank layout the engine and groups rely on: coords and rank_of must be inverses."""
    plan = ParallelPlan(tp=2, pp=2, dp=2)
    assert plan.world_size == 8 and plan.name == "tp2xpp2xdp2"
    assert [plan.coords(r) for r in (0, 1, 2, 5, 7)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 1), (1, 1, 1)]
    assert all(plan.rank_of(*plan.coords(r)) == r for r in range(8))
    for name in ("tp4", "pp2", "dp2", "tp2xpp2", "single"):
        assert ParallelPlan.parse(name).name == name
    with pytest.raises(ValueError, match="plan must look like"):
        ParallelPlan.parse("zp3")


@pytest.mark.parametrize("strategy, n, dims, expected", [
    ("tp", 2, SMOLLM2, "tp2"),          # 3 KV heads split 2+1 (uneven, by whole KV heads)
    ("tp", 4, SMOLLM2, "tp2xpp2"),      # TP4 impossible with 3 KV heads: falls back to the hybrid
    ("hybrid", 4, SMOLLM2, "tp2xpp2"),
    ("hybrid", 2, SMOLLM2, "tp2"),      # no TPxPP factorization of 2: TP over both (splits memory and time)
    ("hybrid", 8, QWEN_1_5B, "tp2xpp4"),  # largest TP that fits 2 KV heads
    ("pp", 4, SMOLLM2, "pp4"),
    ("dp", 4, SMOLLM2, "dp4"),
    ("tp", 1, SMOLLM2, "single"),
])
def test_plan_for_strategy(strategy, n, dims, expected):
    """Guards the strategy -> plan mapping, including fallbacks when the model cannot take the split."""
    assert plan_for_strategy(strategy, n, dims).name == expected


def test_validation_errors_say_what_fits():
    """Guards error quality: an invalid plan names the constraint and the sizes that would fit."""
    with pytest.raises(ValueError, match=r"tp=4 exceeds num_key_value_heads=3.*fit this model: \[1, 2, 3\]"):
        validate_plan(ParallelPlan(tp=4), SMOLLM2, 4)
    with pytest.raises(ValueError, match=r"num_attention_heads=9 is not divisible by tp=2.*\[1, 3\]"):
        validate_plan(ParallelPlan(tp=2), SMOLLM2, 2, even_tp=True)
    with pytest.raises(ValueError, match="pp=4 stages but the model has only num_hidden_layers=2"):
        validate_plan(ParallelPlan(pp=4), TINY, 4)
    with pytest.raises(ValueError, match="product is 4"):
        validate_plan(ParallelPlan(tp=2), TINY, 4)
    assert fitting_tp_sizes(QWEN_1_5B, even_tp=True) == [1, 2]
    assert factorizations(8) == [(2, 4), (4, 2)] and factorizations(7) == []
    assert [p.name for p in all_plans(4, SMOLLM2)] == ["pp4", "dp4", "tp2xpp2"]


def test_dims_from_hf_config():
    """Guards reading shapes from a real transformers config (GQA: KV heads differ from heads)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, intermediate_size=64,
                      hidden_size=32)
    assert ModelDims.from_config(cfg) == ModelDims(3, 8, 2, 64)


def test_build_launch_single_node_gpu():
    """Guards the launch contract: accelerate's torchrun path, the worker module, and the NCCL safety env."""
    cmd, env = build_launch(LaunchConfig(model="/m", gpus=4, plan="auto", worker_args=("--trace", "t.jsonl"),
                                         python="py"), {"PATH": "/bin", "NCCL_NVLS_ENABLE": "1"})
    assert cmd[:4] == ["py", "-m", "accelerate.commands.launch", "--multi_gpu"]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and "--machine_rank" not in cmd
    assert cmd[cmd.index("-m", 3) + 1] == "hf_adaptive.parallel.worker"
    assert cmd[-6:] == ["--model", "/m", "--plan", "auto", "--trace", "t.jsonl"]
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["HF_ADAPTIVE_BACKEND"] == "nccl" and env["PATH"] == "/bin"
    # One machine: port 0 (accelerate picks a free one), a file rendezvous and no agent TCP store, gloo on loopback.
    assert cmd[cmd.index("--main_process_port") + 1] == "0"
    assert cmd[cmd.index("--rdzv_backend") + 1] == "c10d" and cmd[cmd.index("--rdzv_conf") + 1] == "store_type=file"
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1" and env["GLOO_SOCKET_IFNAME"] == "lo"


def test_build_launch_multi_node_and_cpu():
    """Guards multi-node rendezvous flags (total processes = gpus x machines), the CPU/gloo switch, and Hub access
    only for a Hub id."""
    base = {"HOME": "/h"}
    cmd, env = build_launch(LaunchConfig(model="m", gpus=8, num_machines=2, machine_rank=1,
                                         main_process_ip="10.0.0.1", main_process_port=1234, plan="tp2xpp4",
                                         python="py"), base)
    assert cmd[cmd.index("--num_processes") + 1] == "16" and cmd[cmd.index("--num_machines") + 1] == "2"
    assert cmd[cmd.index("--machine_rank") + 1] == "1" and cmd[cmd.index("--main_process_ip") + 1] == "10.0.0.1"
    assert cmd[cmd.index("--main_process_port") + 1] == "1234"
    assert "--rdzv_backend" not in cmd and "GLOO_SOCKET_IFNAME" not in env  # across machines: reachable stores
    assert base == {"HOME": "/h"}  # pure: the caller's mapping is not modified
    cmd, env = build_launch(LaunchConfig(model="m", gpus=2, cpu=True, python="py"), base)
    assert env["HF_ADAPTIVE_BACKEND"] == "gloo" and env["CUDA_VISIBLE_DEVICES"] == "" and "--multi_gpu" in cmd
    cmd, env = build_launch(LaunchConfig(model="m", gpus=1, python="py"), base)
    assert "--multi_gpu" not in cmd and env["HF_HUB_OFFLINE"] == "1"  # an embedded name: no Hub traffic
    _, env = build_launch(LaunchConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", gpus=1, python="py"), base)
    assert "HF_HUB_OFFLINE" not in env  # a Hub id: the workers may fetch it
    _, env = build_launch(LaunchConfig(model="m", gpus=1, python="py"), {"HF_HUB_OFFLINE": "0"})
    assert env["HF_HUB_OFFLINE"] == "0"  # the caller's choice stands


@pytest.mark.parametrize("kwargs, match", [
    ({"gpus": 0}, "gpus must be >= 1"),
    ({"gpus": 2, "plan": "fsdp"}, "plan must be one of"),
    ({"gpus": 2, "num_machines": 2}, "main_process_ip is required"),
    ({"gpus": 2, "num_machines": 2, "machine_rank": 2, "main_process_ip": "x"}, "machine_rank must be in"),
    ({"gpus": 2, "main_process_port": 70000}, "main_process_port must be in"),
])
def test_launch_config_errors(kwargs, match):
    """Guards launch errors that name the parameter and its allowed values instead of failing in torchrun."""
    with pytest.raises(ValueError, match=match):
        LaunchConfig(model="m", **kwargs)


def test_launch_command_dry_run(capsys):
    """Guards the CLI wiring: `hf-adaptive launch --dry-run` prints the built command and runs nothing."""
    import argparse

    from hf_adaptive.commands.launch import launch_command_parser

    parser = argparse.ArgumentParser()
    launch_command_parser(parser.add_subparsers())
    args = parser.parse_args(["launch", "--model", "m", "--gpus", "2", "--cpu", "--trace", "t.jsonl",
                              "--dry-run", "--", "--cooldown-s", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "HF_ADAPTIVE_BACKEND=gloo" in out and "--trace t.jsonl" in out and out.rstrip().endswith("--cooldown-s 1")


def test_worker_policy_knobs_memory_bands_sit_above_the_admission_ceiling(caplog, capsys):
    from hf_adaptive.parallel.worker import build_parser, policy_config

    dims = ModelDims(num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=64)

    def config(*extra):
        return policy_config(build_parser().parse_args(["--model", "m", *extra]), 2, dims)

    default = config()  # headroom 0.15: admission fills to 0.85, so memory pressure starts above it
    assert (default.hybrid_memory.enter, default.pipeline_memory.enter) == (0.9, 0.95)
    assert (default.dp_short_tokens.enter, default.dp_short_tokens.exit) == (256, 320)
    loose = config("--memory-headroom", "0.3", "--dp-short-tokens", "400")
    assert (loose.hybrid_memory.enter, loose.pipeline_memory.enter) == (0.8, 0.9)
    assert (loose.dp_short_tokens.enter, loose.dp_short_tokens.exit) == (400, 500)
    explicit = config("--hybrid-memory", "0.6", "--pipeline-memory", "0.7")
    assert (explicit.hybrid_memory.enter, explicit.hybrid_memory.exit) == (0.6, pytest.approx(0.5))
    assert "below the admission ceiling" in caplog.text
    for flag, value in (("--pipeline-memory", "0.05"), ("--dp-short-tokens", "0"), ("--cooldown-s", "nan")):
        with pytest.raises(SystemExit) as refused:  # a usage error of the flag itself, before any config
            config(flag, value)
        assert refused.value.code == 2 and flag in capsys.readouterr().err


def test_gpu_launch_on_a_host_without_cuda_is_one_clear_error():
    """Guards `launch --gpus 1` without --cpu on a CPU-only host, which failed deep in torch after the processes
    started: refused up front, naming --cpu as the fix."""
    with pytest.raises(ValueError, match=r"--gpus 1 .* has none .* add --cpu"):
        check_devices(LaunchConfig(model="m", gpus=1), cuda_devices=0)
    with pytest.raises(ValueError, match="--gpus 4 exceeds the 2 CUDA device"):
        check_devices(LaunchConfig(model="m", gpus=4), cuda_devices=2)
    check_devices(LaunchConfig(model="m", gpus=4, cpu=True), cuda_devices=0)
    check_devices(LaunchConfig(model="m", gpus=2), cuda_devices=2)


def test_launch_command_checks_devices_before_starting_anything():
    import argparse

    import torch

    from hf_adaptive.commands.launch import launch_command_parser

    if torch.cuda.device_count():
        pytest.skip("this host has CUDA devices")
    parser = argparse.ArgumentParser()
    launch_command_parser(parser.add_subparsers())
    args = parser.parse_args(["launch", "--model", "m", "--gpus", "1"])
    with pytest.raises(ValueError, match="add --cpu"):
        args.func(args)


def test_worker_limits_and_serve_settings_are_checked():
    """Guards limits that would be accepted and fail later: each names the setting and the value."""
    from hf_adaptive.parallel.protocol import ServeConfig
    from hf_adaptive.parallel.worker import build_parser, serve_limits

    with pytest.raises(ValueError, match="max_queued must be an int >= 1, got 0"):
        serve_limits(build_parser().parse_args(["--model", "m", "--max-queued", "0"]))
    with pytest.raises(ValueError, match="request_timeout_s must be a finite"):
        serve_limits(build_parser().parse_args(["--model", "m", "--request-timeout-s", "nan"]))
    with pytest.raises(ValueError, match="arrival_window_s must be > 0"):
        ServeConfig(arrival_window_s=0)
    with pytest.raises(ValueError, match="warmup_token_modulus must be an int >= 1"):
        ServeConfig(warmup_token_modulus=0)
    assert build_parser().parse_args(["--model", "m"]).http_host == "127.0.0.1"


def test_run_results_map_back_by_position_not_by_id():
    """Guards crossed answers at the rank protocol: two requests with one id in two replicas each get their own
    replica's row (a dict keyed by request id would hand both the same one)."""
    from hf_adaptive.parallel.protocol import RunResult, tokens_by_request
    from hf_adaptive.parallel.requests import Request

    a, b, c = (Request("same", 0.0, 2, prompt_ids=[i]) for i in range(3))
    batches = ((a, b), (c,))
    gathered = [(RunResult(0, ((1, 1), (2, 2))), 0.1), (RunResult(1, ((3, 3),)), 0.1), (None, 0.1)]
    tokens = tokens_by_request(batches, gathered)
    assert [tokens[id(r)] for r in (a, b, c)] == [[1, 1], [2, 2], [3, 3]]
    with pytest.raises(RuntimeError, match="disagree on the batch"):
        tokens_by_request(batches, [(RunResult(1, ((3, 3), (4, 4))), 0.1)])


@pytest.mark.parametrize("spec, cuda_devices, match", [
    ("cuda", 0, "asks for CUDA but this host has none.*use --device cpu"),
    ("cuda:3", 2, "has 2 CUDA device"),
    ("tpu", 2, "is not a device"),
    ("meta", 2, "only cpu and cuda"),
])
def test_device_flag_is_checked_before_loading(spec, cuda_devices, match):
    """Guards `--device cuda` on a CPU build, which ended in torch's "not compiled with CUDA" AssertionError."""
    from hf_adaptive.devices import check_device

    with pytest.raises(ValueError, match=match):
        check_device(spec, cuda_devices)
    assert check_device("cpu", 0) == "cpu" and check_device("cuda:1", 2) == "cuda:1" and check_device(None) is None


def test_cli_device_flag_is_one_usage_error(capsys):
    import torch

    from hf_adaptive.cli import main

    if torch.cuda.device_count():
        pytest.skip("this host has CUDA devices")
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--device", "cuda"])
    assert stop.value.code == 2 and "use --device cpu" in capsys.readouterr().err
