"""AdaptiveKVCache in packed-attention mode: decode steps hand the packed view to attn "hf_adaptive".

The fused path (torch reference on CPU, Triton on CUDA) must generate what the dequantize path generates.
"""

from __future__ import annotations

import pytest
import torch

import hf_adaptive
from hf_adaptive.attention import interface, triton_decode
from hf_adaptive.kv.cache import AdaptiveKVCache
from helpers import load_eval_script, make_tiny_model

ARCHS = ("llama", "qwen2", "gemma3")
NEW_TOKENS = 24


def _inputs(device="cpu"):
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding on row 0
    return ids.to(device), mask.to(device)


def _generate(model, fused: bool, bits: int, device="cpu", block: int = 8, **gen):
    if fused:
        hf_adaptive.enable_fused_attention(model)
    else:
        model.set_attn_implementation("sdpa")
    cache = AdaptiveKVCache(model.config, fixed_bits=bits, residual_length=block, block_size=block,
                            value_group=block, packed_attention="auto")
    ids, mask = _inputs(device)
    out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW_TOKENS,
                         do_sample=False, output_scores=True, return_dict_in_generate=True, **gen)
    return out, cache


def _count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _max_score_diff(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.scores, b.scores))


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_decode_is_lossless_at_16_bits(arch, monkeypatch):
    """Guards against the packed decode path reading the wrong blocks/tail/mask (left padding, GQA, gemma3's
    sliding layers): at 16 bits it must give the dequantize path's greedy tokens, and it must really be used."""
    model = make_tiny_model(arch)
    ref, _ = _generate(model, fused=False, bits=16)
    calls = _count_calls(monkeypatch, interface, "reference_decode_attention")
    got, cache = _generate(model, fused=True, bits=16)
    full_layers = sum(1 for t in model.config.layer_types if t == "full_attention") \
        if getattr(model.config, "layer_types", None) else model.config.num_hidden_layers
    assert len(calls) == (NEW_TOKENS - 1) * full_layers  # every decode step of every full layer, no prefill
    assert torch.equal(ref.sequences, got.sequences)
    assert _max_score_diff(ref, got) < 1e-4
    assert cache.stats()["layers"][-1]["blocks"] >= 4  # history blocks existed, not only the tail


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits", [8, 4])
def test_fused_decode_matches_dequantize_path_quantized(arch, bits):
    """Guards against the fused path de-quantizing differently from the cache's own dequantize path
    (scale/zero layout, packed code order, slot mapping): logits of every decode step must agree.

    Not bit-equal by design: the packed view is built after this step's flush, so a block leaving the exact
    tail is read quantized one step earlier than on the dequantize path. The gap must stay well below the
    quantization error itself (dequantize path vs lossless 16 bits)."""
    model = make_tiny_model(arch)
    lossless, _ = _generate(model, fused=False, bits=16)
    ref, _ = _generate(model, fused=False, bits=bits)
    got, _ = _generate(model, fused=True, bits=bits)
    assert torch.equal(ref.sequences, got.sequences)
    gap, quant_error = _max_score_diff(ref, got), _max_score_diff(ref, lossless)
    assert gap < 0.5 * quant_error
    assert gap < {8: 5e-4, 4: 5e-3}[bits]


def test_beam_search_with_fused_decode():
    """Guards against reorder_cache leaving the packed view stale (pools reordered per beam, block table
    reused): beam search over the fused path must give the dequantize path's sequences."""
    model = make_tiny_model("llama")
    ref, _ = _generate(model, fused=False, bits=4, num_beams=3)
    got, _ = _generate(model, fused=True, bits=4, num_beams=3)
    assert torch.equal(ref.sequences, got.sequences)


def test_packed_attention_modes():
    """Guards against the cache sending packed handles to an attention function that cannot read them
    (auto must follow the model's attn implementation) and against an invalid flag being accepted."""
    model = make_tiny_model("llama")
    model.set_attn_implementation("sdpa")
    assert not AdaptiveKVCache(model.config).packed_decode_enabled()
    assert AdaptiveKVCache(model.config, packed_attention=True).packed_decode_enabled()
    hf_adaptive.enable_fused_attention(model)
    assert AdaptiveKVCache(model.config).packed_decode_enabled()
    assert not AdaptiveKVCache(model.config, packed_attention=False).packed_decode_enabled()
    with pytest.raises(ValueError, match="packed_attention"):
        AdaptiveKVCache(model.config, packed_attention="yes")
    with pytest.raises(ValueError, match="packed_attention"):
        AdaptiveKVCache(model.config, packed_attention=1)


def test_packed_handle_does_not_mark_stored_tail():
    """Guards against the packed-view mark sticking to the stored tail tensor (a later non-packed read of
    the tail would then be mistaken for the whole layer) and the block table being rebuilt every step."""
    model = make_tiny_model("llama")
    _, cache = _generate(model, fused=True, bits=4)
    layer = cache.layers[0]
    assert interface.packed_view_of(layer.tail_keys) is None
    table = layer._gather[2]
    assert layer.packed_view().block_bits.data_ptr() == table[0].data_ptr()  # cached, not rebuilt
    from hf_adaptive.kv import layer as layer_module  # packed decode never builds the dequantize gather index

    assert layer._gather[0] is layer_module._UNBUILT and layer._full is None  # nor the whole sequence
    assert cache.get_mask_sizes(1, 0)[0] == cache.get_seq_length() + 1
    assert interface.packed_view_of(layer.keys) is None and layer.keys.shape[-2] == cache.get_seq_length()


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_fused_decode_on_gpu_uses_triton(arch, bits, monkeypatch):
    """Guards against the Triton kernel diverging from the dequantize path inside a real generate (bf16,
    left padding, sliding layers): decode logits agree within bf16 tolerance and the kernel really runs."""
    model = make_tiny_model(arch, dtype=torch.bfloat16).cuda()
    # the Triton kernel takes power-of-two blocks >= 16 (block_size=8 raised a ValueError on an H100)
    ref, _ = _generate(model, fused=False, bits=bits, device="cuda", block=16)
    calls = _count_calls(monkeypatch, triton_decode, "triton_decode_attention")
    got, _ = _generate(model, fused=True, bits=bits, device="cuda", block=16)
    assert calls
    steps = 0
    for x, y, a, b in zip(ref.scores, got.scores, ref.sequences.T[40:], got.sequences.T[40:]):
        scale = x.float().abs().max().item()
        assert (x.float() - y.float()).abs().max().item() <= 3e-2 * scale + 1e-2
        steps += 1
        if not torch.equal(a, b):  # a bf16 near-tie may flip a token; later steps see different inputs
            break
    assert steps >= 4


def test_gpu_pressure_accounts_for_per_process_cap():
    """Guards against GPU pressure mode ignoring torch.cuda.set_per_process_memory_fraction: mem_get_info
    shows a mostly free card while this process is near its allocator cap, so the cache would not demote
    and would run out of memory. Injected numbers, no GPU needed."""
    from hf_adaptive.kv.pressure import gpu_reading

    gib = 2**30
    # 80 GiB card, 70 GiB free card-wide, process capped at 0.125 (10 GiB) with 9 GiB allocated
    capped = gpu_reading(70 * gib, 80 * gib, 9 * gib, target_fraction=0.9, process_fraction=0.125)
    assert capped.source == "gpu_process_cap" and capped.limit_bytes == 9 * gib
    assert capped.fraction == pytest.approx(1.0)
    uncapped = gpu_reading(70 * gib, 80 * gib, 9 * gib, target_fraction=0.9, process_fraction=1.0)
    assert uncapped.source == "gpu" and uncapped.fraction == pytest.approx(10 / 72)
    # another process filling the card: the card-wide limit is the tighter one even under a cap
    busy = gpu_reading(2 * gib, 80 * gib, 1 * gib, target_fraction=0.9, process_fraction=0.5)
    assert busy.source == "gpu" and busy.fraction == pytest.approx(78 / 72)


@pytest.mark.gpu
def test_gpu_pressure_sees_per_process_cap_on_gpu():
    """Guards against GPUMemoryPressure reading only mem_get_info under set_per_process_memory_fraction:
    with a cap 2 GiB above what this process already holds and 1.5 GiB more allocated, the pressure must be
    near 1, not near 0 (earlier tests in the same process may still hold memory: the cap counts it)."""
    from hf_adaptive.kv.pressure import GPUMemoryPressure

    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = torch.cuda.memory_reserved(0) + 2 * 2**30
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        block = torch.empty(3 * 2**29, dtype=torch.uint8, device="cuda")  # 1.5 GiB
        fraction = None if hasattr(torch.cuda, "get_per_process_memory_fraction") else cap / total
        reading = GPUMemoryPressure(0.9, process_fraction=fraction).read(0)
        assert reading.source == "gpu_process_cap", reading
        assert 0.75 < reading.fraction < 1.0, reading
        del block
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_oom_survival_defaults_prove_the_claim():
    """Guards against oom_survival.py defaults that cannot show survival: by arithmetic, weights + bf16 KV
    must exceed the cap while weights + 4-bit KV fit under the adaptive cache's target share of it."""
    oom = load_eval_script("oom_survival")
    info = oom.arithmetic(oom.parse_args([]))
    assert not info["dynamic_fits"] and info["adaptive_fits"]
    assert info["dynamic_needs_gib"] > 1.3 * info["cap_gib"]
    assert info["adaptive_floor_gib"] < 0.5 * info["cap_gib"]


def test_bench_kv_e2e_smoke(tmp_path):
    """Guards against the end-to-end bench breaking (cache construction, prefill hand-off into each cache's
    update(), fused switch, report): a tiny CPU grid must produce a measured row per cache and the files."""
    import json

    bench = load_eval_script("bench_kv_e2e")
    bench.main(["--device", "cpu", "--dtype", "float32", "--shape", "tiny", "--contexts", "256", "--batch-sizes", "2",
                "--new-tokens", "2", "--repeats", "1", "--warmup", "1", "--caches", "dynamic,adaptive4,fused4",
                "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_kv_e2e.json").read_text())["rows"]
    assert [r["cache"] for r in rows] == ["dynamic", "adaptive4", "fused4"]
    assert all("skipped" not in r and r["ms_per_token"] > 0 for r in rows)
    assert rows[1]["kv_gib"] == rows[2]["kv_gib"] < rows[0]["kv_gib"]
    assert (tmp_path / "bench_kv_e2e.png").stat().st_size > 0
