"""AdaptiveStaticKVCache: the compile-friendly adaptive cache (static shapes, device lengths, eager step hooks)."""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig, DynamicCache

import hf_adaptive
from hf_adaptive.kv.cache import generate_cache_kwargs
from hf_adaptive.kv.pressure import PressureReading, ScriptedPressure
from hf_adaptive.compat import forward_cache_kwargs
from hf_adaptive.kv.static import AdaptiveStaticKVCache

from helpers import make_tiny_model

SMALL = dict(residual_length=16, block_size=16, value_group=16)


def _generate(model, ids, cache, new_tokens, compiled=False, backend="aot_eager"):
    if compiled:
        cc = CompileConfig(backend=backend, mode=None, fullgraph=False)
        cc._compile_all_devices = True  # compile on CPU too (transformers compiles on accelerators only)
        extra = {"compile_config": cc}
    else:
        extra = {"disable_compile": True}
    return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **generate_cache_kwargs(cache), **extra)


def _graph_counter():
    """A dynamo backend that runs graphs eagerly and records each one it is handed (one per (re)compile)."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, counting


@pytest.fixture(scope="module")
def tiny():
    model = make_tiny_model("llama")
    ids = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(3))
    ref = _generate(model, ids, DynamicCache(config=model.config), 40)
    hf_adaptive.enable_fused_attention(model)
    return model, ids, ref


def test_static_16bit_is_lossless_eager(tiny):
    """Guards the tail/block bookkeeping: at 16 bits the static cache must decode exactly like DynamicCache
    (a wrong row index, a stale tail row or an off-by-one device length changes the tokens)."""
    model, ids, ref = tiny
    cache = AdaptiveStaticKVCache(model.config, max_cache_len=37 + 48, **SMALL)
    out = _generate(model, ids, cache, 40)
    assert torch.equal(out, ref)
    stats = cache.stats()
    assert stats["layers"][0]["tokens"] == 37 + 40 - 1  # the last token is sampled, never fed back
    assert stats["layers"][0]["blocks"] >= 3  # blocks really moved out of the tail during decode


def test_compiled_decode_matches_eager_and_compiles_once(tiny):
    """Guards the compile path: the step must trace with the hooks outside the graph, give the eager tokens
    (4-bit, so history really is read from the quantized pools) and not recompile per step."""
    model, ids, _ = tiny
    eager = _generate(model, ids, AdaptiveStaticKVCache(model.config, max_cache_len=90, fixed_bits=4, **SMALL), 40)
    graphs, counting = _graph_counter()
    torch._dynamo.reset()
    cache = AdaptiveStaticKVCache(model.config, max_cache_len=90, fixed_bits=4, **SMALL)
    out = _generate(model, ids, cache, 40, compiled=True, backend=counting)
    assert torch.equal(out, eager)
    assert len(cache.history) == 40  # the host step ran eagerly on every forward (prefill + 39 decode steps)
    assert 1 <= len(graphs) <= 2, f"{len(graphs)} graphs compiled for 39 decode steps"
    assert cache.stats()["layers"][0]["tokens_by_bits"]["4"] > 0
    assert all(layer._full is None for layer in cache.layers)  # the compiled steps never built keys/values
    assert cache.layers[0].keys.shape[-2] == cache.get_seq_length()


def test_pressure_switch_under_compile_does_not_retrace(tiny):
    """Guards adaptivity on the compiled path: a pressure walk 16 -> 8 -> 4 bits mid-generation must take effect
    (8- and 4-bit blocks appear, 16-bit ones are demoted and their pool released) without re-tracing the step:
    the view keeps one pool per reachable precision, with dynamic extents (an H100 re-trace cost 18.7 s)."""
    model, ids, _ = tiny
    eager_cache = AdaptiveStaticKVCache(model.config, max_cache_len=90,
                                        pressure=ScriptedPressure([0.0] * 6 + [0.75] * 16 + [0.9] * 200), **SMALL)
    eager = _generate(model, ids, eager_cache, 40)
    graphs, counting = _graph_counter()
    torch._dynamo.reset()
    pressure = ScriptedPressure([0.0] * 6 + [0.75] * 16 + [0.9] * 200)
    cache = AdaptiveStaticKVCache(model.config, max_cache_len=90, pressure=pressure, **SMALL)
    out = _generate(model, ids, cache, 40, compiled=True, backend=counting)
    assert torch.equal(out, eager)
    bits_seen = {h["bits"] for h in cache.history}
    assert bits_seen == {16, 8, 4}, bits_seen
    assert cache.stats()["layers"][0]["tokens_by_bits"]["4"] > 0
    assert cache.view_changes >= 2  # pools appeared / were released mid-generation...
    assert len(graphs) == 1, f"{len(graphs)} graphs for one decode step shape"  # ...and the step was traced once


def test_reset_reuses_buffers_without_recompiling(tiny):
    """Guards reuse across generate calls: reset() must keep every buffer at its address (so the compiled step and
    its CUDA graph are reused), a reused cache must give a fresh cache's tokens, calls of other prompt and output
    lengths under one max_cache_len must compile nothing new, and the device lengths the step advances itself
    must end equal to the host's counts."""
    model, ids, _ = tiny
    graphs, counting = _graph_counter()
    torch._dynamo.reset()
    cache = AdaptiveStaticKVCache(model.config, max_cache_len=90, fixed_bits=4, **SMALL)
    _generate(model, ids, cache, 20, compiled=True, backend=counting)
    layer0 = cache.layers[0]
    buffers = [t.data_ptr() for layer in cache.layers for t in (layer.tail_k, layer.table)]
    buffers += [p.tensors["k_codes"].data_ptr() for layer in cache.layers for p in layer.pools.values()]
    compiled = len(graphs)
    for n_prompt, n_new in ((37, 20), (21, 30), (30, 12)):
        cache.reset()
        out = _generate(model, ids[:, :n_prompt], cache, n_new, compiled=True, backend=counting)
        fresh = AdaptiveStaticKVCache(model.config, max_cache_len=90, fixed_bits=4, **SMALL)
        assert torch.equal(out, _generate(model, ids[:, :n_prompt], fresh, n_new)), (n_prompt, n_new)
        n_blocks = len(layer0.block_bits)
        assert cache.lengths.lens.tolist() == [n_blocks, layer0.n_tail]
        assert int(cache.lengths.seen) == n_blocks * 16 + layer0.n_tail == n_prompt + n_new - 1
    after = [t.data_ptr() for layer in cache.layers for t in (layer.tail_k, layer.table)]
    after += [p.tensors["k_codes"].data_ptr() for layer in cache.layers for p in layer.pools.values()]
    assert after == buffers
    assert len(graphs) == compiled, f"{len(graphs) - compiled} graphs compiled by reused calls"
    assert cache.stats()["host_us_per_step"] > 0


@pytest.mark.parametrize("setting", [dict(fixed_bits=4), dict(memory_budget=60_000)], ids=["4bit", "ladder"])
def test_twenty_mixed_calls_compile_nothing_after_warm_up(tiny, setting):
    """Guards the way people call generate: 20 calls of mixed prompt lengths and max_new_tokens against one
    max_cache_len (the cache reused through reset(), and under a budget whose ladder switches precision inside
    calls) must compile no new graph after the first call, and each call must give a fresh cache's tokens."""
    model, ids, _ = tiny
    graphs, counting = _graph_counter()
    torch._dynamo.reset()
    cache = AdaptiveStaticKVCache(model.config, max_cache_len=90, **setting, **SMALL)
    _generate(model, ids, cache, 20, compiled=True, backend=counting)
    warm = len(graphs)
    rng = torch.Generator().manual_seed(5)
    bits_seen = set()
    for i in range(20):
        n_prompt = int(torch.randint(3, 38, (), generator=rng))
        n_new = int(torch.randint(1, 90 - 37, (), generator=rng))
        cache.reset()
        out = _generate(model, ids[:, :n_prompt], cache, n_new, compiled=True, backend=counting)
        bits_seen |= {h["bits"] for h in cache.history}
        if i % 5 == 0:  # the eager reference costs as much as the call: check a quarter of them
            fresh = AdaptiveStaticKVCache(model.config, max_cache_len=90, **setting, **SMALL)
            assert torch.equal(out, _generate(model, ids[:, :n_prompt], fresh, n_new)), (n_prompt, n_new)
    assert len(graphs) == warm, f"{len(graphs) - warm} graphs compiled after the warm-up call"
    if "memory_budget" in setting:
        assert len(bits_seen) > 1, bits_seen  # the ladder really moved inside the calls


def test_crop_within_tail_is_exact(tiny):
    """Guards crop (assisted decoding): dropping the last tokens and re-feeding them must restore the logits."""
    model, ids, _ = tiny
    cache = AdaptiveStaticKVCache(model.config, max_cache_len=64, **SMALL)
    with torch.no_grad():
        model(input_ids=ids[:, :30], use_cache=True, **forward_cache_kwargs(model, cache))
        first = model(input_ids=ids[:, 30:33], use_cache=True, **forward_cache_kwargs(model, cache)).logits
        cache.crop(-3)
        assert cache.get_seq_length() == 30
        again = model(input_ids=ids[:, 30:33], use_cache=True, **forward_cache_kwargs(model, cache)).logits
    torch.testing.assert_close(first, again)


def test_errors_name_the_fix(tiny):
    """Guards the error contract: bad max_cache_len and hybrid (sliding) models fail with the fix named."""
    model, _, _ = tiny
    with pytest.raises(ValueError, match="max_cache_len"):
        AdaptiveStaticKVCache(model.config, max_cache_len=0)
    gemma = make_tiny_model("gemma3")
    with pytest.raises(ValueError, match="AdaptiveKVCache"):
        AdaptiveStaticKVCache(gemma.config, max_cache_len=64)


@pytest.mark.gpu
def test_compiled_static_cache_on_gpu_matches_eager():
    """Guards the CUDA path: inductor + CUDA graphs + the Triton kernel with device lengths must give the
    tokens of the same cache decoded eagerly (the torch reference dequantizes; bf16 near-ties aside, equal)."""
    model = make_tiny_model("llama", dtype=torch.float32).cuda()
    hf_adaptive.enable_fused_attention(model)
    ids = torch.randint(0, 128, (2, 100), generator=torch.Generator().manual_seed(5)).cuda()
    kw = dict(max_cache_len=200, fixed_bits=4, residual_length=32, block_size=32, value_group=32)
    eager = _generate(model, ids, AdaptiveStaticKVCache(model.config, **kw), 64)
    torch._dynamo.reset()
    cache = AdaptiveStaticKVCache(model.config, **kw)
    cc = CompileConfig(fullgraph=False)  # transformers' default: inductor, reduce-overhead (CUDA graphs)
    out = model.generate(ids, max_new_tokens=64, do_sample=False, compile_config=cc, **generate_cache_kwargs(cache))
    agree = (out == eager).float().mean().item()
    assert agree > 0.97, agree
    assert cache.view_changes == 0


class _WalkAfterWarmUp:
    """Pressure 0 until ``start()``, then 0 for 6 reads, 0.75 for 16, 0.9 after: a 16 -> 8 -> 4 bit walk."""

    def __init__(self) -> None:
        self.reads, self.started_at = 0, None

    def start(self) -> None:
        self.started_at = self.reads

    def read(self, projected_kv_bytes: int) -> PressureReading:
        i = -1 if self.started_at is None else self.reads - self.started_at
        self.reads += 1
        fraction = 0.0 if i < 6 else 0.75 if i < 22 else 0.9
        return PressureReading(fraction, "scripted", projected_kv_bytes, None)


@pytest.mark.gpu
def test_precision_switches_on_gpu_capture_nothing(monkeypatch):
    """Guards the address book: on CUDA the compiled step reads the pools through one fixed tensor of addresses,
    so a 16 -> 8 -> 4 walk that creates and releases pools mid-call must neither recompile nor re-capture the
    CUDA graph of a step captured before (a capture per switch cost a generate call milliseconds per switch)."""
    captures = []
    enter = torch.cuda.graph.__enter__
    monkeypatch.setattr(torch.cuda.graph, "__enter__", lambda g, *a, **k: (captures.append(1), enter(g, *a, **k))[1])
    model = make_tiny_model("llama", dtype=torch.float32).cuda()
    hf_adaptive.enable_fused_attention(model)
    ids = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(5)).cuda()
    cc = CompileConfig(fullgraph=False)  # transformers' default: inductor, reduce-overhead (CUDA graphs)
    torch._dynamo.reset()
    walk = _WalkAfterWarmUp()
    cache = AdaptiveStaticKVCache(model.config, max_cache_len=90, pressure=walk, **SMALL)
    for _ in range(2):  # warm-up: compile, then capture, at 16 bits
        model.generate(ids, max_new_tokens=40, do_sample=False, compile_config=cc, **generate_cache_kwargs(cache))
        cache.reset()
    graphs, n_captures = torch._dynamo.utils.counters["stats"]["unique_graphs"], len(captures)
    walk.start()
    out = model.generate(ids, max_new_tokens=40, do_sample=False, compile_config=cc, **generate_cache_kwargs(cache))
    assert {h["bits"] for h in cache.history} == {16, 8, 4}
    assert cache.view_changes >= 2  # pools appeared and were released during the call...
    assert len(captures) == n_captures, "a precision switch re-captured the CUDA graph"  # ...and nothing re-captured
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    eager_walk = _WalkAfterWarmUp()
    eager_walk.start()
    eager = _generate(model, ids, AdaptiveStaticKVCache(model.config, max_cache_len=90, pressure=eager_walk, **SMALL),
                      40)
    assert (out == eager).float().mean().item() > 0.97


def test_demotion_under_pressure_publishes_next_step(tiny):
    """Guards the static demotion path: under pressure past the demotion threshold, stored 16-bit blocks must be
    re-stored at 4 bits (counted), pools emptied by demotion released, and decoding stay close to DynamicCache."""
    model, ids, ref = tiny
    pressure = ScriptedPressure([0.0] * 20 + [0.99] * 200)
    cache = AdaptiveStaticKVCache(model.config, max_cache_len=90, pressure=pressure, **SMALL)
    out = _generate(model, ids, cache, 40)
    stats = cache.stats()
    assert stats["demotions"].get("16->4", 0) > 0
    assert stats["layers"][0]["tokens_by_bits"]["16"] <= SMALL["residual_length"] + SMALL["block_size"]
    assert 16 not in cache.layers[0].pools  # emptied by demotion, released as a whole
    assert (out[:, ids.shape[1]:] == ref[:, ids.shape[1]:]).float().mean() > 0.5
    _assert_book_table_matches_host(cache)
    cache.reset()
    assert all(int(layer.group_starts.abs().sum()) == 0 for layer in cache.layers)  # no block left in any group


def _assert_book_table_matches_host(cache):
    """Every layer's device copy of the block table (logical rows, grouped rows, group starts) is the host table's."""
    from hf_adaptive.kv import packed

    for layer in cache.layers:
        n = len(layer.block_bits)
        rows, starts = packed.book_table(layer.block_bits, layer.block_slot)
        assert layer.table[:, :n].tolist() == rows
        assert layer.group_starts.tolist() == starts
        assert starts[-1] == n and n > 0


def test_decode_without_step_hooks_matches_hooked():
    """Guards the path where attention is switched to hf_adaptive but the step hooks are not installed: decode
    must still read a consistent static view (mask sized for it) and give the hooked tokens."""
    from hf_adaptive.attention.interface import ATTENTION_NAME, register_attention

    hooked = make_tiny_model("llama")
    hf_adaptive.enable_fused_attention(hooked)
    bare = make_tiny_model("llama")
    register_attention()
    bare.set_attn_implementation(ATTENTION_NAME)
    ids = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(4))
    outs = [_generate(m, ids, AdaptiveStaticKVCache(m.config, max_cache_len=90, fixed_bits=4, **SMALL), 40)
            for m in (hooked, bare)]
    assert torch.equal(outs[0], outs[1])


def test_beam_search_reorders_the_static_cache_exactly(tiny):
    """Guards ``_apply_batch`` (beam reordering every step) on the static layout: at 16 bits, beam search
    through the static cache, its placeholder pools included, must equal beam search on DynamicCache."""
    model, ids, _ = tiny
    short = ids[:, :20]
    ref = model.generate(short, max_new_tokens=24, do_sample=False, num_beams=2, disable_compile=True,
                         **generate_cache_kwargs(DynamicCache(config=model.config)))
    cache = AdaptiveStaticKVCache(model.config, max_cache_len=60, residual_length=8, block_size=8, value_group=16)
    out = model.generate(short, max_new_tokens=24, do_sample=False, num_beams=2, disable_compile=True,
                         **generate_cache_kwargs(cache))
    assert torch.equal(out, ref)
    assert cache.stats()["layers"][0]["blocks"] >= 2  # history blocks existed while beams were reordered
