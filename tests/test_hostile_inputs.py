"""Hostile input: every value that enters from a user is checked where it enters, and nothing is left silently wrong.

Each test names the fault it guards; the property tests (hypothesis, derandomized) throw generated traces,
calibrations and byte quantities at the parsers and accept only a result or the documented ValueError / TypeError.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import make_tiny_model
from hf_adaptive.cli import main as cli_main
from hf_adaptive.kv.cache import AdaptiveKVCache, generate_cache_kwargs
from hf_adaptive.kv.config import KVCacheConfig
from hf_adaptive.kv.pressure import BudgetPressure, ScriptedPressure
from hf_adaptive.kv.static import AdaptiveStaticKVCache
from hf_adaptive.parallel.calibration_file import calibration_from_dict, read_calibration
from hf_adaptive.parallel.calibration_fit import batches_of, fit_latency
from hf_adaptive.parallel.capacity import ReplicaMemory
from hf_adaptive.parallel.cost_model import Calibration, PlanCost
from hf_adaptive.parallel.plans import ParallelPlan
from hf_adaptive.parallel.requests import Request, load_trace
from hf_adaptive.parallel.simulator import SimConfig, simulate
from hf_adaptive.parallel.trace_file import parse_trace_line
from hf_adaptive.policy.kv_policy import FixedBitsPolicy, HysteresisPolicy, Stage
from hf_adaptive.policy.parallel_policy import Band, ParallelPolicy, ParallelPolicyConfig
from hf_adaptive.policy.precision_policy import PrecisionPolicyConfig
from hf_adaptive.precision.controller import PrecisionController
from hf_adaptive.precision.tiers import prepare_tiers
from hf_adaptive.units import parse_bytes

REPO = Path(__file__).resolve().parents[1]
CALIBRATION = REPO / "eval/calibration/parallel_cpu_gloo_2proc.json"
FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- traces and the simulator

def test_simulate_cli_refuses_a_nan_arrival_instead_of_spinning(tmp_path):
    """Guards the hang: "arrival_s": NaN made max(now, nan) stall virtual time forever (a child process, so the
    old code fails by timing out rather than hanging the suite)."""
    trace = _write(tmp_path / "nan.jsonl", ['{"id": "a", "arrival_s": 0, "prompt_tokens": 8}',
                                            '{"id": "b", "arrival_s": NaN, "prompt_tokens": 8}'])
    run = subprocess.run([sys.executable, "-m", "hf_adaptive.cli", "simulate", "--trace", str(trace),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"{trace}:2: arrival_s must be a finite number" in run.stderr


@pytest.mark.parametrize("line,words", [
    ('{"arrival_s": Infinity, "prompt_tokens": 8}', ["arrival_s", "finite", "inf"]),
    ('{"arrival_s": -1, "prompt_tokens": 8}', ["arrival_s", ">= 0", "-1"]),
    ('{"prompt_tokens": -5}', ["prompt_tokens", ">= 1", "-5"]),
    ('{"prompt_tokens": 8, "max_new_tokens": 0}', ["max_new_tokens", ">= 1", "0"]),
    ('{"prompt_tokens": 8.5}', ["prompt_tokens", "an int", "8.5"]),
    ('{"prompt_tokens": "8"}', ["prompt_tokens", "an int", "'8'"]),
    ('{"prompt": 12}', ["prompt", "str", "12"]),
    ('{"arival_s": 1, "prompt_tokens": 8}', ["unknown field", "arival_s", "arrival_s"]),
    ('{"id": [1], "prompt_tokens": 8}', ["id", "string or an int"]),
    ('[1, 2]', ["JSON object", "list"]),
])
def test_trace_fields_are_checked_with_file_line_field_and_fix(tmp_path, line, words):
    """Guards negative lengths and infinite arrivals accepted with exit code 0 ("nan tok/s"), and wrong types
    accepted by int()/float() casts: each is one line naming the file and line, the field, the value and a fix."""
    trace = _write(tmp_path / "t.jsonl", ['{"id": "ok", "prompt_tokens": 4}', "", line])
    with pytest.raises((ValueError, TypeError)) as err:
        load_trace(trace)
    message = str(err.value)
    assert message.startswith(f"{trace}:3: ") and "Fix:" in message and "\n" not in message
    assert all(w in message for w in words), message


def test_trace_json_errors_name_the_file_line_not_line_one(tmp_path):
    """Guards JSONDecodeError reporting 'line 1' (of the one line it was given) for a break on line 3."""
    trace = _write(tmp_path / "t.jsonl", ['{"prompt_tokens": 4}', '{"prompt_tokens": 5}', '{"prompt_tokens": 6'])
    with pytest.raises(ValueError, match=re.escape(f"{trace}:3: column 20: not JSON")):
        load_trace(trace)


def test_trace_missing_file_and_duplicate_ids(tmp_path):
    """Guards a raw FileNotFoundError (and UnicodeDecodeError, IsADirectoryError), and duplicate ids (results are
    keyed by id) being accepted."""
    with pytest.raises(ValueError, match=r"trace '.*missing.jsonl' does not exist .*Fix: pass a JSONL trace"):
        load_trace(tmp_path / "missing.jsonl")
    trace = _write(tmp_path / "t.jsonl", ['{"id": "x", "prompt_tokens": 4}', '{"id": "x", "prompt_tokens": 5}'])
    with pytest.raises(ValueError, match=r":2: id 'x' is already used on line 1"):
        load_trace(trace)
    (tmp_path / "binary.jsonl").write_bytes(b'{"prompt_tokens": 4}\n\xff\xfe')
    with pytest.raises(ValueError, match=r"binary.jsonl:2: the trace is not UTF-8 text \(byte 0xff\)"):
        load_trace(tmp_path / "binary.jsonl")
    with pytest.raises(ValueError, match="is a directory"):
        load_trace(tmp_path)


def _calibration() -> Calibration:
    cost = PlanCost(5.0, 0.01, 2.0, 0.2, 0.001, 1e9, 1e5)
    return Calibration(2, 16e9, 50.0, {"tp2": cost, "pp2": cost, "dp2": cost}, {})


def _plan_for(strategy: str) -> ParallelPlan:
    return {"tp": ParallelPlan(tp=2), "pp": ParallelPlan(pp=2), "dp": ParallelPlan(dp=2),
            "hybrid": ParallelPlan(pp=2)}[strategy]


@pytest.mark.parametrize("field,value", [("arrival_s", math.nan), ("arrival_s", math.inf), ("arrival_s", -1.0),
                                         ("max_new_tokens", -3), ("prompt_tokens", 0)])
def test_simulate_refuses_requests_built_in_code(field, value):
    """Guards the library path: Request objects built in code reach simulate() without any trace parser."""
    fields = dict(id="r", arrival_s=0.0, max_new_tokens=4, prompt_tokens=8) | {field: value}
    with pytest.raises(ValueError, match=f"request 'r': {field}"):
        simulate([Request(**fields)], _calibration(), _plan_for, static_plan=ParallelPlan(tp=2))


# ---------------------------------------------------------------- calibrations

@pytest.mark.parametrize("edit,words", [
    (lambda c: c["plans"]["pp2"].update(decode_ms_base=-1), ["plans.pp2.decode_ms_base", ">= 0", "-1"]),
    (lambda c: c.update(device_memory_bytes=-5), ["device_memory_bytes", "> 0", "-5"]),
    (lambda c: c.update(switch_cost_ms=float("nan")), ["switch_cost_ms", "finite", "nan"]),
    (lambda c: c.update(device_memory_bytes="16e9"), ["device_memory_bytes", "'16e9'", "str"]),
    (lambda c: c.pop("world_size"), ["'world_size' is missing"]),
    (lambda c: c["plans"]["tp2"].pop("prefill_ms_base"), ["plans.tp2 lacks", "prefill_ms_base"]),
    (lambda c: c["plans"]["tp2"].update(decode_ms_per_sequence=1.0), ["unknown coefficient", "decode_ms_per_seq"]),
    (lambda c: c["plans"].update(tp3=c["plans"]["tp2"]), ["plan 'tp3' spans 3 devices", "world_size is 2"]),
    (lambda c: c.update(memory_headroom=1.0), ["memory_headroom", "< 1.0"]),
    (lambda c: c["meta"]["dims"].update(num_layers=0), ["meta.dims.num_layers", ">= 1"]),
])
def test_calibration_fields_are_checked_with_file_line_field_and_fix(tmp_path, edit, words):
    """Guards negative costs / memory accepted with exit code 0, NaN costs, and KeyError / raw float() errors."""
    raw = json.loads(CALIBRATION.read_text())
    edit(raw)
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(raw, indent=1))
    with pytest.raises((ValueError, TypeError)) as err:
        Calibration.load(path)
    message = str(err.value)
    assert re.match(re.escape(str(path)) + r":\d+: ", message) and "Fix:" in message and "\n" not in message
    assert all(w in message for w in words), message


def test_calibration_points_at_the_line_of_the_bad_field(tmp_path):
    """Guards errors without a place: the line named is the one holding the bad coefficient."""
    raw = json.loads(CALIBRATION.read_text())
    raw["plans"]["pp2"]["decode_ms_per_seq"] = -2.0
    text = json.dumps(raw, indent=1)
    (tmp_path / "c.json").write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if '"decode_ms_per_seq": -2.0' in t)
    with pytest.raises(ValueError, match=f"c.json:{line}: plans.pp2.decode_ms_per_seq"):
        read_calibration(tmp_path / "c.json")
    (tmp_path / "broken.json").write_text(text[:300] + "\n]")
    with pytest.raises(ValueError, match=r"broken.json:\d+: not JSON"):
        read_calibration(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="calibration '.*nope.json' does not exist"):
        read_calibration(tmp_path / "nope.json")


# ---------------------------------------------------------------- constructors and parameters

@pytest.mark.parametrize("build,error,words", [
    (lambda: KVCacheConfig(fixed_bits=4.0), ValueError, ["fixed_bits", "4.0", "float"]),
    (lambda: KVCacheConfig(gpu_memory_fraction="0.9"), TypeError, ["gpu_memory_fraction", "'0.9'", "Fix"]),
    (lambda: KVCacheConfig(gpu_memory_fraction=math.nan), ValueError, ["gpu_memory_fraction", "finite"]),
    (lambda: KVCacheConfig(policy="x"), TypeError, ["policy", "KVPolicyConfig", "'x'"]),
    (lambda: KVCacheConfig(side_stream="no"), TypeError, ["side_stream", "bool"]),
    (lambda: BudgetPressure(0), ValueError, ["budget_bytes", "positive"]),
    (lambda: BudgetPressure(-1), ValueError, ["budget_bytes", "positive"]),
    (lambda: ScriptedPressure([0.5, math.nan]), ValueError, ["fractions[1]", "finite"]),
    (lambda: Stage(3, False, 0.5, 0.4), ValueError, ["Stage.bits", "3"]),
    (lambda: Stage(8, 1, 0.5, 0.4), TypeError, ["Stage.demote", "bool"]),
    (lambda: FixedBitsPolicy(4.0), ValueError, ["fixed_bits", "4.0"]),
    (lambda: HysteresisPolicy().decide(math.nan, 0), ValueError, ["pressure fraction", "nan"]),
    (lambda: PrecisionPolicyConfig(high="0.9"), TypeError, ["high", "'0.9'"]),
    (lambda: PrecisionPolicyConfig(min_dwell_steps=1.5), TypeError, ["min_dwell_steps", "int"]),
    (lambda: ParallelPolicyConfig(cooldown_s=math.nan), ValueError, ["cooldown_s", "finite"]),
    (lambda: ParallelPolicyConfig(queue_head_requests=True), TypeError, ["queue_head_requests", "bool"]),
    (lambda: Band(math.nan, 0.5), ValueError, ["Band.enter", "finite"]),
    (lambda: parse_bytes("9" * 400 + "GiB"), ValueError, ["memory_budget", "too large"]),
    (lambda: AdaptiveKVCache(make_tiny_model("llama").config, memory_budget=1.5e9), TypeError, ["memory_budget"]),
    (lambda: SimConfig(max_batch_per_replica=2.5), TypeError, ["batch cap", "2.5"]),
    (lambda: ReplicaMemory(math.nan, 1.0), ValueError, ["kv_bytes_per_token", "finite"]),
    (lambda: batches_of({"requests": [{"id": "a", "plan": "tp2", "start_s": 5.0, "finish_s": 1.0,
                                       "prompt_tokens": 8, "new_tokens": 4}]}), ValueError, ["requests[0].finish_s"]),
    (lambda: batches_of({"requests": [{"id": "a", "plan": "tq2"}]}), ValueError, ["requests[0] lacks"]),
    (lambda: batches_of({"runs": []}), TypeError, ["requests", "write_report"]),
    (lambda: fit_latency([]), ValueError, ["no batches"]),
    (lambda: prepare_tiers(make_tiny_model("llama"), tiers="int4"), TypeError, ["tiers", "'int4'"]),
    (lambda: prepare_tiers(make_tiny_model("llama"), group_size="128"), TypeError, ["group_size", "'128'"]),
])
def test_constructors_refuse_values_that_fail_later(build, error, words):
    """Guards types accepted at construction and failing later (4.0 == 4 passes a membership test; BudgetPressure(0)
    divided by zero at the first read; a NaN pressure made the ladder call max() of nothing; a NaN cooldown
    compares False both ways) and the OverflowError of a 400-digit budget."""
    with pytest.raises(error) as err:
        build()
    assert all(w in str(err.value) for w in words), str(err.value)
    assert BudgetPressure("1KiB").read(512).fraction == 0.5


def test_static_cache_refuses_a_max_cache_len_past_the_model():
    """Guards an absurd max_cache_len being accepted and sizing every pool for it (the tiny model attends 512)."""
    config = make_tiny_model("llama").config
    with pytest.raises(ValueError, match=r"max_cache_len=1000000 is longer than the model attends \(512 .*"
                                         r"Fix: max_cache_len <= 512"):
        AdaptiveStaticKVCache(config, max_cache_len=10**6)
    with pytest.raises(TypeError, match="max_cache_len must be an int"):
        AdaptiveStaticKVCache(config, max_cache_len=64.0)
    assert AdaptiveStaticKVCache(config, max_cache_len=512).max_cache_len == 512


def _bart(causal: bool):
    from transformers import BartConfig, BartForCausalLM, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)
    return (BartForCausalLM if causal else BartForConditionalGeneration)(cfg).eval()


@pytest.mark.parametrize("causal", [True, False])
def test_encoder_decoder_models_are_refused_clearly(causal):
    """Guards BART's IndexError from the cache (its config counts encoder layers) and prepare_tiers tiering the
    encoder's layers: both name the architecture and what to use instead."""
    model = _bart(causal)
    with pytest.raises(ValueError, match="AdaptiveKVCache supports decoder-only models; model_type='bart'.*Fix:"):
        AdaptiveKVCache(model.config)
    with pytest.raises(ValueError, match="prepare_tiers supports decoder-only models"):
        prepare_tiers(model, tiers=("int4", "fp32"))


def test_budget_fix_holds_for_an_fp32_model(tmp_path):
    """Guards the memory-budget error's Fix assuming 2-byte elements: on an fp32 model (dtype recorded by
    from_pretrained) the suggested budget must pass the first real update too."""
    from transformers import AutoModelForCausalLM

    make_tiny_model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with pytest.raises(ValueError, match="at 4 bytes/element") as err:
        AdaptiveKVCache(model.config, memory_budget=1000)
    needed = int(re.search(r"Fix: memory_budget >= (\d+)", str(err.value)).group(1))
    cache = AdaptiveKVCache(model.config, memory_budget=needed)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), use_cache=True, **generate_cache_kwargs(cache))  # the first update re-checks
    assert cache.get_seq_length() == 3


# ---------------------------------------------------------------- the command line

def test_cli_prints_one_line_and_exit_code_2_for_bad_input(tmp_path, capsys):
    """Guards raw tracebacks for user errors: one line, exit code 2; --debug (anywhere) shows the traceback."""
    trace = _write(tmp_path / "t.jsonl", ['{"prompt_tokens": -5}'])
    args = ["simulate", "--trace", str(trace), "--out", str(tmp_path / "out")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-adaptive simulate: error: ") and "prompt_tokens" in err and "\n" not in err
    with pytest.raises(ValueError, match="prompt_tokens"):
        cli_main(args + ["--debug"])
    assert cli_main(["simulate", "--trace", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("argv,flag", [
    (["simulate", "--trace", "t.jsonl", "--arrival-scale", "nan"], "--arrival-scale"),
    (["simulate", "--trace", "t.jsonl", "--device-memory-gb", "-1"], "--device-memory-gb"),
    (["simulate", "--trace", "t.jsonl", "--cooldown-s", "inf"], "--cooldown-s"),
    (["simulate", "--trace", "t.jsonl", "--max-batch", "0"], "--max-batch"),
    (["generate", "--max-new-tokens", "1e400"], "--max-new-tokens"),
    (["generate", "--gpu-memory-fraction", "1.5"], "--gpu-memory-fraction"),
    (["eval", "speed", "--out", "x", "--repeats", "0"], "--repeats"),
    (["precision", "--mode", "cascade", "--self-stop", "1"], "--self-stop"),
])
def test_cli_numeric_flags_refuse_nan_inf_and_range(argv, flag, capsys):
    """Guards argparse's float()/int() accepting nan, inf and negative values that fail (or hang) later."""
    with pytest.raises(SystemExit) as refused:
        cli_main(argv)
    assert refused.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("extra, named", [(["--sample"], "--sample"), (["--plot", "p.png"], "--plot")])
def test_precision_cascade_refuses_what_it_cannot_do_before_loading(extra, named, capsys):
    """Guards the cascade mode's limits: it decodes greedily and reports per round, so sampling or a tier plot is
    refused in one line naming the flag, before any model is loaded."""
    assert cli_main(["precision", "hi", "--mode", "cascade", "--model", "/nonexistent", *extra]) == 2
    err = capsys.readouterr().err
    assert named in err and "/nonexistent" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch build or machine without CUDA")
def test_device_cuda_on_a_cpu_build_is_one_clear_line(capsys):
    """Guards the bare AssertionError ("Torch not compiled with CUDA enabled") from .to('cuda')."""
    from hf_adaptive.models import check_device

    with pytest.raises(ValueError, match=r"'cuda' asks for CUDA but this host has none .*use --device cpu"):
        check_device("cuda")
    with pytest.raises(ValueError, match="is not a device"):
        check_device("gpu0")
    for argv in (["generate", "--device", "cuda", "hi"], ["eval", "speed", "--out", "x", "--device", "cuda"]):
        with pytest.raises(SystemExit) as stop:  # an argparse usage error: one line, exit code 2
            cli_main(argv)
        assert stop.value.code == 2 and "use --device cpu" in capsys.readouterr().err


# ---------------------------------------------------------------- models: GGUF, manifests, Hub ids

def write_tiny_gguf(path: Path, seed: int = 0, vocab: int = 32, hidden: int = 16, inter: int = 32) -> Path:
    """A real one-layer Llama GGUF (fp32 tensors, a byte-level sentencepiece vocabulary) that transformers loads."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(inter)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_dimension_count(hidden // 2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(vocab - 3)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [6] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    shapes = {"token_embd": (vocab, hidden), "blk.0.attn_q": (hidden, hidden), "blk.0.attn_k": (hidden // 2, hidden),
              "blk.0.attn_v": (hidden // 2, hidden), "blk.0.attn_output": (hidden, hidden),
              "blk.0.ffn_gate": (inter, hidden), "blk.0.ffn_up": (inter, hidden), "blk.0.ffn_down": (hidden, inter),
              "output": (vocab, hidden)}
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.1).astype(np.float32))
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        w.add_tensor(f"{name}.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def model_home(tmp_path, monkeypatch):
    """A private HF_ADAPTIVE_HOME: conversions never touch the user's cache."""
    monkeypatch.setenv("HF_ADAPTIVE_HOME", str(tmp_path / "home"))
    return tmp_path


def test_gguf_with_valid_header_and_random_body_is_one_clear_error(model_home):
    """Guards the UnicodeDecodeError from transformers' GGUF reader, and a non-GGUF file named .gguf."""
    from hf_adaptive.models import resolve_model_dir

    rng = random.Random(0)
    junk = model_home / "junk.gguf"
    junk.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2, 3) + bytes(rng.randrange(256) for _ in range(4096)))
    with pytest.raises(ValueError, match=r"junk.gguf has a GGUF header but transformers cannot load it "
                                         r"\(UnicodeDecodeError.*Fix: download the file again"):
        resolve_model_dir(junk)
    (model_home / "text.gguf").write_text("hello")
    with pytest.raises(ValueError, match=r"text.gguf is not a GGUF file \(it starts with b'hell'"):
        resolve_model_dir(model_home / "text.gguf")
    assert not list((model_home / "home" / "checkpoints").glob("*")), "a failed conversion left a checkpoint"


def _damage(folder: Path, how: str) -> None:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if how == "zeroed":  # same size, the header kept: only the hash can tell
        weights.write_bytes(data[:-4096] + bytes(4096))
    elif how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "no manifest":  # an interrupted conversion, or one by an older version
        (folder / "hf_adaptive_manifest.json").unlink()


@pytest.mark.parametrize("how", ["zeroed", "truncated", "no manifest"])
def test_damaged_converted_checkpoint_is_rebuilt(model_home, how):
    """Guards a converted checkpoint counting as valid once config.json exists: zeroed weights gave an empty answer
    with exit code 0 and a truncated file a raw SafetensorError. The manifest check rebuilds it from the GGUF."""
    from hf_adaptive.manifest import checkpoint_problem
    from hf_adaptive.models import load_model, resolve_model_dir

    gguf_path = write_tiny_gguf(model_home / "tiny.gguf")
    folder = resolve_model_dir(gguf_path)
    manifest = json.loads((folder / "hf_adaptive_manifest.json").read_text())
    assert {"config.json", "model.safetensors"} <= set(manifest["files"]) and checkpoint_problem(folder) is None
    model, _ = load_model(gguf_path, device="cpu")
    reference = model(torch.tensor([[1, 5, 9]])).logits
    _damage(folder, how)
    assert checkpoint_problem(folder) is not None
    assert resolve_model_dir(gguf_path) == folder and checkpoint_problem(folder) is None
    model, _ = load_model(gguf_path, device="cpu")
    assert torch.equal(model(torch.tensor([[1, 5, 9]])).logits, reference)


def test_a_conversion_finishing_second_keeps_the_complete_copy(model_home):
    """Guards two processes converting one GGUF: the later rename must neither fail nor leave its partial folder."""
    from hf_adaptive.manifest import checkpoint_problem
    from hf_adaptive.models import convert_gguf, resolve_model_dir

    gguf_path = write_tiny_gguf(model_home / "tiny.gguf")
    folder = resolve_model_dir(gguf_path)
    convert_gguf(gguf_path, folder)  # as a second process would, after the first renamed its copy into place
    assert checkpoint_problem(folder) is None
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_hub_id_offline_is_a_clear_error_and_a_cached_snapshot_resolves(tmp_path, monkeypatch):
    """Guards Hub ids being refused as unknown specs: offline and uncached is one error naming the cause; a snapshot
    already in the Hugging Face cache resolves offline."""
    from huggingface_hub import constants

    from hf_adaptive.models import looks_like_hub_id, resolve_model_dir

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=r"model='hf-adaptive-tests/absent' names no local path and looks like a "
                                         r"Hugging Face Hub id, but the Hub is offline here .*Fix: check the path"):
        resolve_model_dir("hf-adaptive-tests/absent")
    repo = tmp_path / "hub" / "models--hf-adaptive-tests--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert resolve_model_dir("hf-adaptive-tests/tiny") == snapshot
    assert not looks_like_hub_id(str(tmp_path)) and not looks_like_hub_id("smollm2-135m-instruct")


# ---------------------------------------------------------------- precision tiers: no silent state

def _sharp_model(seed: int = 0):
    """A tiny Llama whose sharpened lm_head makes every decode step confident: the controller picks int4."""
    model = make_tiny_model("llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(200)
    return model


def _generate(model, processors=()):
    ids = torch.tensor([[3, 17, 42, 9, 77, 5]])
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          logits_processor=list(processors))


def test_close_restores_the_top_tier_and_removes_hooks(one_torch_thread):
    """Guards close() leaving the model on the int4 tier of the last step, so the next plain generate was lossy;
    and the context-manager form."""
    model = _sharp_model()
    tiers = prepare_tiers(model, tiers=("int4", "fp32"))
    reference = _generate(model)
    with PrecisionController(tiers) as ctl:
        _generate(model, [ctl])
        assert tiers.active == "int4" and "int4" in ctl.telemetry.tiers
    assert tiers.active == "fp32"
    assert not model._forward_pre_hooks and not model.get_input_embeddings()._forward_pre_hooks
    assert not model.get_output_embeddings()._forward_hooks
    assert torch.equal(_generate(model), reference)
    with pytest.raises(ValueError, match="called after close"):
        ctl(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 128))


def test_controller_refuses_a_model_its_tiers_were_not_prepared_on(one_torch_thread):
    """Guards a controller handed to another model's generate: it switched the tiers of a model that was not
    generating and reported the steps as int4 while the generating model ran full precision."""
    prepared, other = _sharp_model(0), _sharp_model(1)
    tiers = prepare_tiers(prepared, tiers=("int4", "fp32"))
    with PrecisionController(tiers) as ctl:
        with pytest.raises(ValueError, match="did not run the model its tiers were prepared on"):
            _generate(other, [ctl])
        assert ctl.telemetry.report()["steps"] == 0
    with pytest.raises(TypeError, match="tiers must be the handle prepare_tiers returns"):
        PrecisionController(prepared)


def test_prepare_tiers_falls_back_for_a_vocab_the_cpu_kernel_cannot_take(caplog, one_torch_thread):
    """Guards the raw RuntimeError of _convert_weight_to_int4pack_cpu for an lm_head of 136 rows (a multiple of 8,
    not of 16): that matrix stays on the next slower tier, with a warning, and the int4 tier still runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=136, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    tiers = prepare_tiers(model, tiers=("int4", "fp32"))
    assert tiers.unsupported == {"int4": 1} and "run the next slower prepared tier" in caplog.text
    with tiers.use("int4"), torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


# ---------------------------------------------------------------- property tests: no hang, no unhandled exception

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8))
JSON_VALUES = SCALARS | st.lists(SCALARS, max_size=2) | st.dictionaries(st.text(max_size=4), SCALARS, max_size=2)
HOSTILE = JSON_VALUES | st.sampled_from([math.nan, math.inf, -math.inf, -1, 0, 2**31, 2**80, 1e308, "", "8", True])


@st.composite
def trace_rows(draw) -> dict:
    """A valid request row with 0-2 of its fields (or an unknown one) set to hostile values or removed."""
    row = {"id": draw(st.text(min_size=1, max_size=4) | st.integers(0, 99)),
           "arrival_s": draw(st.floats(0, 50) | st.integers(0, 50)), "max_new_tokens": draw(st.integers(1, 64))}
    row.update({"prompt": draw(st.text(max_size=20))} if draw(st.booleans())
               else {"prompt_tokens": draw(st.integers(1, 5000))})
    for key in draw(st.lists(st.sampled_from(["id", "arrival_s", "max_new_tokens", "prompt", "prompt_tokens",
                                              "extra"]), max_size=2)):
        if draw(st.integers(0, 3)) == 0:
            row.pop(key, None)
        else:
            row[key] = draw(HOSTILE)
    return row


@st.composite
def trace_lines(draw) -> str:
    """A JSON line (NaN / Infinity tokens included), a cut-off one, or arbitrary text."""
    text = json.dumps(draw(trace_rows()))
    kind = draw(st.sampled_from(["json", "json", "json", "cut", "text"]))
    if kind == "cut":
        return text[:draw(st.integers(0, len(text)))]
    return draw(st.text(max_size=40)) if kind == "text" else text


@settings(FUZZ, max_examples=10000)
@given(trace_lines())
def test_fuzz_trace_line_parser(line):
    """Any line gives checked fields or a ValueError / TypeError; accepted fields are finite and in range."""
    try:
        fields = parse_trace_line(line, 7)
    except (ValueError, TypeError):
        return
    assert math.isfinite(fields["arrival_s"]) and fields["arrival_s"] >= 0 and fields["max_new_tokens"] >= 1
    assert (fields["prompt"] is None) != (fields["prompt_tokens"] is None)


FUZZ_DIR = Path(__import__("tempfile").mkdtemp(prefix="hf_adaptive_fuzz_"))


@settings(FUZZ, max_examples=600)
@given(st.lists(trace_lines() | st.just(""), min_size=1, max_size=6))
def test_fuzz_trace_file_then_simulate_terminates(lines):
    """A trace that parses replays to the end on a static plan and the adaptive policy, with finite numbers."""
    path = _write(FUZZ_DIR / "trace.jsonl", lines)
    try:
        requests = load_trace(path)
    except (ValueError, TypeError):
        return
    for run in (dict(static_plan=ParallelPlan(dp=2)), dict(policy=ParallelPolicy())):
        summary = simulate(requests, _calibration(), _plan_for, **run).summary(2)
        assert math.isfinite(summary["throughput_tok_s"]) and summary["requests"] + summary["rejected"] == len(requests)


CALIBRATION_RAW = json.loads(CALIBRATION.read_text())
CALIBRATION_PATHS = [(k,) for k in CALIBRATION_RAW if k != "plans"] + [("memory_headroom",), ("warm_batch_extra_ms",)] \
    + [("plans", p, c) for p in CALIBRATION_RAW["plans"] for c in CALIBRATION_RAW["plans"][p]] \
    + [("plans", "tp2x"), ("plans", "dp2", "mask_bytes_per_token_squared"), ("meta", "dims", "num_layers")]
NUMBERS = st.floats() | st.integers(-10, 10**12) | st.floats(0, 1e12) | st.lists(st.floats(-1, 1e3), max_size=3)


@st.composite
def calibrations(draw) -> dict:
    """The committed calibration with 1-4 fields set to generated values (numbers, NaN, JSON of any shape) or
    removed."""
    raw = copy.deepcopy(CALIBRATION_RAW)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(CALIBRATION_PATHS))
        parent = raw
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        if draw(st.integers(0, 5)) == 0:
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(NUMBERS | JSON_VALUES)
    return raw


@settings(FUZZ, max_examples=10000)
@given(calibrations())
def test_fuzz_calibration_parser(raw):
    """Any calibration gives a checked Calibration or a ValueError / TypeError; an accepted one has finite,
    non-negative costs and replays a short trace to the end."""
    try:
        calib = calibration_from_dict(raw)
    except (ValueError, TypeError):
        return
    for cost in calib.plans.values():
        assert all(math.isfinite(v) and v >= 0 for v in vars(cost).values())
    requests = [Request(f"r{i}", 0.1 * i, 4, prompt_tokens=16 * (i + 1)) for i in range(3)]
    plan = ParallelPlan.parse(sorted(calib.plans)[0])
    assert math.isfinite(simulate(requests, calib, _plan_for, static_plan=plan).summary(2)["throughput_tok_s"])


BYTE_TEXT = st.from_regex(r"\s?[0-9]{0,24}(\.[0-9]{0,3})?\s?[a-zA-Z]{0,4}\s?", fullmatch=True) \
    | st.builds(lambda n, unit: "9" * n + unit, st.integers(290, 420), st.sampled_from(["", "TB", "GiB", "k"]))


@settings(FUZZ, max_examples=5000)
@given(BYTE_TEXT | st.text(max_size=20) | st.integers() | st.floats() | st.none() | st.booleans() | st.binary())
def test_fuzz_memory_budget_parser(value):
    """Any memory_budget gives a positive int number of bytes or a ValueError / TypeError (no OverflowError)."""
    try:
        number_bytes = parse_bytes(value)
    except (ValueError, TypeError):
        if value is not None:  # None is KVCacheConfig's "no budget"
            with pytest.raises((ValueError, TypeError)):
                KVCacheConfig(memory_budget=value)
        return
    assert isinstance(number_bytes, int) and number_bytes > 0
    assert KVCacheConfig(memory_budget=value).memory_budget == number_bytes
