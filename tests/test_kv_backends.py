"""Quantizer backends (torch, hqq) in the packed layout, and hybrid sliding/full models under quantization."""

from __future__ import annotations

import pytest
import torch

from helpers import make_tiny_model
from hf_adaptive.kv import packed
from hf_adaptive.kv.cache import AdaptiveKVCache, generate_cache_kwargs
from hf_adaptive.kv.layer import AdaptiveFullLayer
from hf_adaptive.kv.sliding import AdaptiveSlidingLayer
from hf_adaptive.kv.quantizers import HQQQuantizer, TorchQuantizer, make_quantizer


def _errors(quantizer, x, bits):
    kc, ks, kz = quantizer.quantize_keys(x, bits, 64)
    vc, vs, vz = quantizer.quantize_values(x, bits, 32)
    k = packed.dequantize_keys(kc, ks, kz, bits, 64, torch.float32)
    v = packed.dequantize_values(vc, vs, vz, bits, 32, torch.float32)
    return (k - x).pow(2).mean().item(), (v - x).pow(2).mean().item(), (kc, ks, kz, vc, vs, vz)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_hqq_codes_in_packed_layout(bits):
    """Guards against hqq's (q - z) * s convention or axis being stored as if it were ours (garbage K/V)."""
    pytest.importorskip("hqq")
    x = torch.randn(2, 2, 128, 64, generator=torch.Generator().manual_seed(0)) * 3 + 1
    k_t, v_t, torch_parts = _errors(TorchQuantizer(), x, bits)
    k_h, v_h, hqq_parts = _errors(HQQQuantizer(), x, bits)
    assert [p.shape for p in torch_parts] == [p.shape for p in hqq_parts]
    assert [p.dtype for p in torch_parts] == [p.dtype for p in hqq_parts]
    # hqq optimizes zero/scale: never worse than min-max beyond fp16 rounding slack
    assert k_h <= k_t * 1.05 and v_h <= v_t * 1.05
    assert k_h < 0.1 * x.var().item() * (2 ** (8 - bits)) / 16


def test_unknown_backend_factory():
    """Guards against a typo in the backend name silently falling back to another quantizer."""
    with pytest.raises(ValueError, match="backend must be one of .*'hqq'.*got 'HQQ'"):
        make_quantizer("HQQ")


@pytest.mark.parametrize("backend", ["torch", "hqq"])
def test_hybrid_gemma3_quantized_generation(backend):
    """Guards against sliding layers being quantized/grown unbounded, or hybrids being refused (as
    transformers' QuantizedCache does)."""
    if backend == "hqq":
        pytest.importorskip("hqq")
    model = make_tiny_model("gemma3")
    cache = AdaptiveKVCache(model.config, fixed_bits=4, backend=backend, residual_length=8, block_size=8)
    ids = torch.randint(1, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=30, do_sample=False, **generate_cache_kwargs(cache))
    assert out.shape == (2, 60)
    sliding, full = cache.layers
    assert isinstance(sliding, AdaptiveSlidingLayer) and isinstance(full, AdaptiveFullLayer)
    assert sliding.keys.shape[-2] <= 16 and set(full.block_bits) == {4} and len(full.block_bits) >= 5
    stats = cache.stats()
    assert stats["layers"][0]["tokens_by_bits"]["4"] == 0 and stats["layers"][1]["tokens_by_bits"]["4"] > 0


def test_quantized_beam_search_and_sampling_run(tiny_model):
    """Guards against reorder/expand paths that only work while the history is 16-bit."""
    cache = AdaptiveKVCache(tiny_model.config, fixed_bits=8, residual_length=8, block_size=8)
    ids = torch.randint(1, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    out = tiny_model.generate(ids, max_new_tokens=16, num_beams=2, do_sample=True, top_k=10,
                              **generate_cache_kwargs(cache))
    assert out.shape == (1, 40) and cache.stats()["layers"][-1]["tokens_by_bits"]["8"] > 0
