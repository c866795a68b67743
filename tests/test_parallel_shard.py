"""Building one rank's shard from the host copy: exact slices, new storage, host untouched; page-locking it."""

from __future__ import annotations

import pytest
import torch

from helpers import make_tiny_model
from hf_adaptive.parallel.plans import ParallelPlan
from hf_adaptive.parallel.shard import build_shard, pin_host_copy, split_evenly


def _host_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _check_tp_shard(host, shard, tp_rank: int, tp: int):
    """Every sharded matrix is the expected slice of the host's, in its own contiguous storage."""
    cfg = host.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    kv_lo, kv_hi = split_evenly(cfg.num_key_value_heads, tp)[tp_rank]
    ff_lo, ff_hi = split_evenly(cfg.intermediate_size, tp)[tp_rank]
    q = slice(kv_lo * group * hd, kv_hi * group * hd)
    kv = slice(kv_lo * hd, kv_hi * hd)
    for h, s in zip(host.model.layers, shard.model.model.layers):
        pairs = [(s.self_attn.q_proj.weight, h.self_attn.q_proj.weight[q]),
                 (s.self_attn.k_proj.weight, h.self_attn.k_proj.weight[kv]),
                 (s.self_attn.v_proj.weight, h.self_attn.v_proj.weight[kv]),
                 (s.self_attn.o_proj.weight, h.self_attn.o_proj.weight[:, q]),
                 (s.mlp.gate_proj.weight, h.mlp.gate_proj.weight[ff_lo:ff_hi]),
                 (s.mlp.up_proj.weight, h.mlp.up_proj.weight[ff_lo:ff_hi]),
                 (s.mlp.down_proj.weight, h.mlp.down_proj.weight[:, ff_lo:ff_hi])]
        for got, want in pairs:
            assert got.is_contiguous() and got.shape == want.shape
            assert torch.equal(got.cpu(), want)
            assert got.untyped_storage().data_ptr() != want.untyped_storage().data_ptr()


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_tp_shard_is_exact_slices_in_new_storage_and_host_untouched(tp_rank):
    host = make_tiny_model("llama", seed=2)
    before = _host_state(host)
    shard = build_shard(host, ParallelPlan(tp=2), tp_rank, "cpu", tp_group=object())  # the group is used in forward
    _check_tp_shard(host, shard, tp_rank, 2)
    assert all(torch.equal(v, before[k]) for k, v in host.state_dict().items())
    assert host.model.layers[0].self_attn.q_proj.weight.shape[0] == host.config.hidden_size  # host not resharded


def test_tp_shard_needs_its_group():
    with pytest.raises(ValueError, match="tp_group"):
        build_shard(make_tiny_model("llama"), ParallelPlan(tp=2), 0, "cpu")


def test_pin_host_copy_refuses_parameters_off_the_cpu():
    model = make_tiny_model("llama").to("meta")
    with pytest.raises(ValueError, match="on the CPU"):
        pin_host_copy(model)


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


@pytest.mark.gpu
def test_pinned_host_copy_keeps_values_and_ties_and_builds_the_same_gpu_shards():
    host = _tied_llama()
    assert host.lm_head.weight is host.model.embed_tokens.weight
    before = _host_state(host)
    reference = [build_shard(host, ParallelPlan(tp=2), r, "cuda", tp_group=object()) for r in (0, 1)]
    nbytes = pin_host_copy(host)
    assert nbytes >= sum(p.numel() * p.element_size() for p in dict.fromkeys(host.parameters()))
    assert all(p.is_pinned() for p in host.parameters())
    assert host.lm_head.weight is host.model.embed_tokens.weight  # still one tensor
    assert all(torch.equal(v, before[k]) for k, v in host.state_dict().items())
    for rank in (0, 1):
        shard = build_shard(host, ParallelPlan(tp=2), rank, "cuda", tp_group=object())
        torch.cuda.synchronize()
        _check_tp_shard(host, shard, rank, 2)
        for (name, got), (_, want) in zip(shard.model.state_dict().items(), reference[rank].model.state_dict().items()):
            assert got.device.type == "cuda" and torch.equal(got, want), name
    full = build_shard(host, ParallelPlan(dp=2), 1, "cuda")
    torch.cuda.synchronize()
    assert all(torch.equal(v.cpu(), before[k]) for k, v in full.model.state_dict().items())


def test_reshard_bench_times_every_switch_on_two_gloo_processes(tmp_path):
    """eval/bench_reshard.py end to end on CPU: every switch of the cycle is timed and sized."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    model = make_tiny_model("llama", seed=1)
    model.save_pretrained(tmp_path / "tiny")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "hf_adaptive.parallel.run_script", "--processes", "2", "--cpu",
           str(repo / "eval/bench_reshard.py"), "--model", str(tmp_path / "tiny"), "--dtype", "float32",
           "--rounds", "2", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out/reshard.json").read_text())
    pairs = [(r["from"], r["to"]) for r in report["switches"]]
    assert pairs == [("tp2", "pp2"), ("pp2", "dp2"), ("dp2", "tp2")] * 2  # 2 rounds, back to the first plan
    assert all(r["seconds"] > 0 and r["mode"] == "pageable" for r in report["switches"])
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    size = {r["to"]: r["bytes_per_device"] for r in report["switches"]}
    assert size["dp2"] == full and size["tp2"] < full and size["pp2"] < full
    assert report["meta"]["logits_identical_both_modes"] is None  # nothing to page-lock on the CPU
    assert (tmp_path / "out/reshard.png").stat().st_size > 0 and "not checked (CPU)" in (
        tmp_path / "out/reshard.md").read_text()


def test_engine_pins_once_and_serves_on_when_page_locked_memory_runs_out(monkeypatch, caplog):
    """Engine.pin: a failed page-lock leaves the host copy pageable with a warning (the run goes on); a successful
    one is recorded and not repeated. The CUDA calls are replaced, so this runs on CPU."""
    import logging

    import hf_adaptive.parallel.engine as engine_mod

    engine = engine_mod.Engine(make_tiny_model("llama"), 0, 1, torch.device("cuda", 0), [ParallelPlan()],
                               pin_host=False)
    assert engine.pinned_bytes == 0

    def out_of_pinned_memory(model):
        raise RuntimeError("CUDA error: out of memory\nmore detail")

    monkeypatch.setattr(engine_mod, "pin_host_copy", out_of_pinned_memory)
    with caplog.at_level(logging.WARNING, logger="hf_adaptive.parallel.engine"):
        assert engine.pin() == 0.0
    assert engine.pinned_bytes == 0 and "--no-pin-host" in caplog.text and "out of memory" in caplog.text
    calls = []
    monkeypatch.setattr(engine_mod, "pin_host_copy", lambda model: calls.append(model) or 4096)
    engine.pin()
    engine.pin()
    assert engine.pinned_bytes == 4096 and len(calls) == 1
