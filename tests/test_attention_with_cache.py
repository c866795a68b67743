"""Contract between AdaptiveKVCache's ``packed_view()`` and the packed-KV attention (CPU; GPU kernel marked).

The cache's ``update()`` returns dense keys/values (history dequantized + exact tail); attention over its
packed view (plus the step's new token) must give what sdpa gives over those dense tensors.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from hf_adaptive.attention.reference import gather_packed_kv, reference_decode_attention
from hf_adaptive.kv.cache import AdaptiveKVCache
from hf_adaptive.kv.packed import PackedKV
from helpers import make_tiny_model

PROBE = "hf_adaptive_test_probe"


def _probe_attention(records):
    """sdpa that also records what each layer's attention received and returned."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def fn(module, query, key, value, attention_mask, **kwargs):
        out, w = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        records[module.layer_idx] = dict(query=query, key=key, value=value, mask=attention_mask, out=out,
                                         scaling=kwargs.get("scaling"))
        return out, w

    return fn


def _with_new_token(view: PackedKV, key: torch.Tensor, value: torch.Tensor) -> PackedKV:
    """The view of the previous step plus this step's token appended to the exact tail."""
    return PackedKV(view.block_size, view.value_group, view.block_bits, view.block_slot, view.full_k, view.full_v,
                    torch.cat([view.tail_k, key[:, :, -1:]], -2), torch.cat([view.tail_v, value[:, :, -1:]], -2),
                    view.pools)


def _run_steps(device="cpu", dtype=torch.float32, bits=4, steps=3):
    """Prefill 70 tokens then decode ``steps`` tokens; per step: (view before the step, the step's records)."""
    model = make_tiny_model("llama", dtype=dtype).to(device)
    records: dict = {}
    AttentionInterface.register(PROBE, _probe_attention(records))
    model.set_attn_implementation(PROBE)
    cache = AdaptiveKVCache(model.config, fixed_bits=bits, residual_length=16, block_size=16, value_group=8,
                            side_stream=False)
    ids = torch.randint(3, 128, (2, 70), generator=torch.Generator().manual_seed(0)).to(device)
    out = []
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        for t in range(steps):
            views = [cache.packed_view(i) for i in range(model.config.num_hidden_layers)]
            model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            out.append((views, dict(records)))
    return out


def test_cache_view_is_what_update_returned():
    """Guards against the cache's packed view and its own dense gather disagreeing (block order, slots,
    pool offsets, scale layout): the view before a step, gathered, must equal the history update() returns."""
    for views, records in _run_steps():
        for i, view in enumerate(views):
            assert sorted(set(view.block_bits.tolist())) == [4], view.block_bits
            k, v = gather_packed_kv(view, torch.float32)
            n = view.num_tokens
            torch.testing.assert_close(k, records[i]["key"][:, :, :n], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(v, records[i]["value"][:, :, :n], rtol=1e-6, atol=1e-6)


def test_attention_over_cache_view_matches_sdpa():
    """Guards against the decode path over a real cache's view diverging from what sdpa computes over the
    cache's dense output (GQA, scaling, tail handling) — the check a cache-side switch to the kernel needs."""
    for views, records in _run_steps():
        for i, view in enumerate(views):
            r = records[i]
            full = _with_new_token(view, r["key"], r["value"])
            got = reference_decode_attention(r["query"], full, scaling=r["scaling"], attention_mask=r["mask"])
            torch.testing.assert_close(got.transpose(1, 2), r["out"], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_triton_kernel_over_cache_view_on_gpu(bits):
    """Guards against the fused kernel mis-reading a live cache's pools (prefix views with pool-capacity
    strides, reused slots): on GPU in bf16 it must match sdpa over the cache's dense output."""
    from hf_adaptive.attention.triton_decode import triton_decode_attention

    for views, records in _run_steps(device="cuda", dtype=torch.bfloat16, bits=bits):
        for i, view in enumerate(views):
            r = records[i]
            full = _with_new_token(view, r["key"], r["value"])
            got = triton_decode_attention(r["query"], full, scaling=r["scaling"]).transpose(1, 2).float()
            want = r["out"].float()
            err = (got - want).abs().max().item()
            assert err <= 1e-2 * want.abs().max().item(), (i, err, tuple(r["query"].shape), full.num_tokens)
