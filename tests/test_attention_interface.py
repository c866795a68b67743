"""``attn_implementation="hf_adaptive"`` inside real transformers models (tiny random-init ones, CPU).

``_PackingLayer`` below is a minimal cache layer written against the hand-off contract of
``hf_adaptive.attention.interface`` (it is not a stand-in for AdaptiveKVCache): it keeps the exact
keys/values, exposes them as a lossless PackedKV (16-bit blocks + tail, optionally 8-bit blocks) and returns
NaN placeholder tensors from ``update()``, so any path that read the placeholders instead of the packed
view would turn the output into NaN.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from hf_adaptive.kv.build import pack_dense_kv
from hf_adaptive.attention.interface import (
    adaptive_attention_forward,
    attach_packed_view,
    key_mask_from_hf,
    packed_view_of,
    register_attention,
)
from hf_adaptive.attention.reference import gather_packed_kv
from helpers import make_tiny_model

BS = 16


class _PackingLayer(DynamicLayer):
    """Keeps exact KV (DynamicLayer) but hands attention only a packed view of it."""

    history_bits = 16

    def update(self, key_states, value_states, *args, **kwargs):
        k, v = super().update(key_states, value_states, *args, **kwargs)
        n_blocks = k.shape[-2] // BS
        packed = pack_dense_kv(k, v, [self.history_bits] * n_blocks, block_size=BS, value_group=8, seed=n_blocks)
        placeholder = torch.full_like(key_states, float("nan"))
        return attach_packed_view(placeholder, packed), torch.full_like(value_states, float("nan"))


def _packing_cache(bits=16):
    layer = type("_Layer", (_PackingLayer,), {"history_bits": bits})
    return Cache(layer_class_to_replicate=layer)


def _generate(model, ids, mask, cache, n=8):
    kw = {"cache" if "cache" in _generate_params(model) else "past_key_values": cache}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)
    return out[:, ids.shape[1]:]


def _generate_params(model):
    import inspect

    # transformers >= 5.23 names the argument `cache`; older releases `past_key_values`
    return inspect.signature(model.forward).parameters


def _prompt(batch=2, length=40, pad=7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :pad] = 0  # left padding on the second sequence
    ids[1, :pad] = 0
    return ids, mask


@functools.lru_cache(maxsize=None)
def _sdpa_tokens(arch):
    """Greedy tokens of the tiny model with sdpa and transformers' DynamicCache: the expected output."""
    ids, mask = _prompt()
    ref = make_tiny_model(arch)
    ref.set_attn_implementation("sdpa")
    return _generate(ref, ids, mask, DynamicCache(config=ref.config))


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_attention()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_plain_cache_generation_matches_sdpa(arch):
    """Guards against the registered function or its mask registration changing results for ordinary
    (unpacked) caches, e.g. a mask of the wrong kind or a dropped sliding window: tokens must equal sdpa's."""
    ids, mask = _prompt()
    want = _sdpa_tokens(arch)
    model = make_tiny_model(arch)
    model.set_attn_implementation("hf_adaptive")
    got = _generate(model, ids, mask, DynamicCache(config=model.config))
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_packed_cache_generation_matches_sdpa(arch):
    """Guards against the packed hand-off being ignored or misread (output layout, GQA, padding mask,
    sliding window on gemma3's local layer, prefill through the gathered view): a lossless packed cache
    must generate exactly sdpa's tokens, and the NaN placeholders prove the packed view was used."""
    ids, mask = _prompt()
    want = _sdpa_tokens(arch)
    model = make_tiny_model(arch)
    model.set_attn_implementation("hf_adaptive")
    got = _generate(model, ids, mask, _packing_cache(16))
    assert torch.equal(got, want), (got, want)


def test_8bit_packed_cache_tracks_sdpa_logits():
    """Guards against the decode path reading quantized blocks wrongly inside a model: with 8-bit history
    blocks the next-token logits must stay close to the exact model's."""
    ids, mask = _prompt(length=64, pad=0)
    ref = make_tiny_model("llama")
    ref.set_attn_implementation("sdpa")
    model = make_tiny_model("llama")
    model.set_attn_implementation("hf_adaptive")
    with torch.no_grad():
        caches = (DynamicCache(config=ref.config), _packing_cache(8))
        outs = [m(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, past_key_values=c)
                for m, c in zip((ref, model), caches)]
        steps = [m(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=o.past_key_values).logits
                 for m, o in zip((ref, model), outs)]
    assert torch.isfinite(steps[1]).all()
    err = (steps[1] - steps[0]).abs().max().item()
    assert 0 < err < 0.05 * steps[0].abs().max().item(), err


def test_decode_call_uses_attached_view_and_returns_hf_layout():
    """Guards against returning (B, Hq, 1, D) instead of transformers' (B, 1, Hq, D) layout, and against
    a plain key tensor being mistaken for a packed one."""
    model = make_tiny_model("llama")
    attn = model.model.layers[0].self_attn
    k = torch.randn(2, 2, 3 * BS + 5, 16)
    v = torch.randn_like(k)
    packed = pack_dense_kv(k, v, [16, 8, 4], block_size=BS, value_group=8)
    q = torch.randn(2, 4, 1, 16)
    assert packed_view_of(k) is None
    out, weights = adaptive_attention_forward(attn, q, attach_packed_view(torch.empty(0), packed), None, None,
                                              scaling=0.25)
    kd, vd = gather_packed_kv(packed, torch.float32)
    want = torch.nn.functional.scaled_dot_product_attention(q, kd, vd, scale=0.25, enable_gqa=True)
    assert weights is None and out.shape == (2, 1, 4, 16)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_key_mask_from_hf_rejects_wrong_length():
    """Guards against a cache reporting the wrong kv length to the mask builder: the error must say so
    instead of attending to misaligned positions."""
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    assert key_mask_from_hf(mask, 2, 10).shape == (2, 10)
    with pytest.raises(ValueError, match="get_mask_sizes"):
        key_mask_from_hf(mask, 2, 12)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [16, 4])
def test_model_decode_through_triton_kernel_on_gpu(bits):
    """Guards against the CUDA dispatch (Triton kernel inside a real model, bf16, left-padding mask turned
    into a key mask) diverging from sdpa: decode-step logits must agree within bf16 / 4-bit error."""
    from hf_adaptive.attention import triton_decode

    assert triton_decode.HAS_TRITON, "the GPU image must have triton"
    ids, mask = (t.cuda() for t in _prompt(length=64, pad=5))
    models = []
    for impl in ("sdpa", "hf_adaptive"):
        m = make_tiny_model("llama", dtype=torch.bfloat16).cuda()
        m.set_attn_implementation(impl)
        models.append(m)
    with torch.no_grad():
        caches = (DynamicCache(config=models[0].config), _packing_cache(bits))
        outs = [m(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, past_key_values=c)
                for m, c in zip(models, caches)]
        steps = [m(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=o.past_key_values).logits.float()
                 for m, o in zip(models, outs)]
    err = (steps[1] - steps[0]).abs().max().item()
    tol = (0.02 if bits == 16 else 0.05) * steps[0].abs().max().item()
    assert torch.isfinite(steps[1]).all() and err <= tol, (err, tol)


def test_static_decode_attention_refuses_tails_that_are_not_the_views():
    """Guards the tails a caller hands in to skip an aliasing guard under compile: eagerly, they must be the view's."""
    import pytest
    import torch

    from hf_adaptive.attention.static_op import static_decode_attention
    from hf_adaptive.kv.packed import PackedKV

    tail = torch.zeros(1, 1, 16, 16)
    empty = torch.zeros(0, dtype=torch.int32)
    view = PackedKV(16, 8, empty, empty, torch.zeros(0), torch.zeros(0), tail, tail.clone(),
                    lengths=torch.tensor([0, 1], dtype=torch.int32), max_tokens=16)
    with pytest.raises(ValueError, match="tail_k/tail_v"):
        static_decode_attention(torch.zeros(1, 1, 1, 16), view, scaling=0.25, tail_k=tail.clone(), tail_v=view.tail_v)
