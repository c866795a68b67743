"""The torch reference of packed-KV attention against naive attention on dequantized tensors (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_adaptive.kv.build import pack_dense_kv
from hf_adaptive.attention.reference import gather_packed_kv, reference_decode_attention
from hf_adaptive.kv.packed import dequantize_keys, dequantize_values

BS = 16  # small blocks keep these tests fast; the layout is the same for any block size


def _dense(B=2, H=2, N=5 * BS + 7, D=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, N, D, generator=g).to(dtype)
    v = torch.randn(B, H, N, D, generator=g).to(dtype)
    return k, v


def _per_block_dequant(packed, dtype=torch.float32):
    """Keys/values rebuilt block by block with a Python loop: an oracle independent of the vectorized gather."""
    ks, vs = [], []
    for bits, slot in zip(packed.block_bits.tolist(), packed.block_slot.tolist()):
        rows = slice(slot * BS, (slot + 1) * BS)
        if bits == 16:
            ks.append(packed.full_k[:, :, rows].to(dtype))
            vs.append(packed.full_v[:, :, rows].to(dtype))
            continue
        p = packed.pools[bits]
        ks.append(dequantize_keys(p.k_codes[:, :, rows], p.k_scale[:, :, slot:slot + 1], p.k_zero[:, :, slot:slot + 1],
                                  bits, BS, dtype))
        vs.append(dequantize_values(p.v_codes[:, :, rows], p.v_scale[:, :, rows], p.v_zero[:, :, rows], bits,
                                    packed.value_group, dtype))
    ks.append(packed.tail_k.to(dtype))
    vs.append(packed.tail_v.to(dtype))
    return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)


def _naive_attention(q, k, v, scaling, softcap=None, window=None, key_mask=None):
    """Textbook attention, one query head at a time, with explicit repeat of the kv heads."""
    B, Hq, L, D = q.shape
    N = k.shape[2]
    k = k.repeat_interleave(Hq // k.shape[1], dim=1)
    v = v.repeat_interleave(Hq // v.shape[1], dim=1)
    out = torch.zeros(B, Hq, L, D)
    for i in range(L):
        pos = N - L + i
        allowed = torch.arange(N) <= pos
        if window:
            allowed &= torch.arange(N) > pos - window
        s = (q[:, :, i:i + 1].float() @ k.float().transpose(-1, -2)) * scaling  # (B, Hq, 1, N)
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        keep = allowed.view(1, 1, 1, N) if key_mask is None else allowed.view(1, 1, 1, N) & key_mask.view(B, 1, 1, N)
        s = s.masked_fill(~keep, float("-inf"))
        out[:, :, i:i + 1] = torch.softmax(s, -1) @ v.float()
    return out


def test_gather_matches_per_block_dequantization():
    """Guards against the gather reading the wrong pool offset or slot when blocks of mixed precision are
    stored at permuted slots with spare slots in between (the paged layout a live cache produces)."""
    k, v = _dense()
    packed = pack_dense_kv(k, v, [8, 16, 4, 2, 8], block_size=BS, value_group=8, spare_slots=2, seed=3)
    got_k, got_v = gather_packed_kv(packed, torch.float32)
    want_k, want_v = _per_block_dequant(packed)
    assert got_k.shape == k.shape == want_k.shape
    torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)
    torch.testing.assert_close(got_v, want_v, rtol=0, atol=0)


def test_gather_of_lossless_blocks_is_exact():
    """Guards against 16-bit blocks or the tail being reordered or converted lossily: all-16 packing must
    give back the original keys/values bit for bit."""
    k, v = _dense(dtype=torch.bfloat16)
    packed = pack_dense_kv(k, v, [16] * 5, block_size=BS, value_group=8, spare_slots=3, seed=1)
    got_k, got_v = gather_packed_kv(packed, torch.bfloat16)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("variant", ["plain", "softcap", "window", "key_mask"])
def test_reference_matches_naive_attention(group, q_len, variant):
    """Guards against GQA head grouping (query head h*G+g must read kv head h), the causal alignment of the
    last q_len positions, and the softcap / sliding-window / padding-mask rules diverging from textbook math."""
    B, H, D = 2, 2, 32
    k, v = _dense(B=B, H=H, D=D, seed=group * 10 + q_len)
    N = k.shape[2]
    q = torch.randn(B, H * group, q_len, D, generator=torch.Generator().manual_seed(7))
    packed = pack_dense_kv(k, v, [4, 8, 16, 2, 4], block_size=BS, value_group=8, seed=group)
    kd, vd = _per_block_dequant(packed)
    key_mask = None
    if variant == "key_mask":  # left padding of 9 tokens on the second sequence
        key_mask = torch.ones(B, N, dtype=torch.bool)
        key_mask[1, :9] = False
    kwargs = dict(softcap=30.0 if variant == "softcap" else None, window=21 if variant == "window" else None)
    scaling = 1 / math.sqrt(D) * (8.0 if variant == "softcap" else 1.0)  # large scores so the cap bites
    want = _naive_attention(q, kd, vd, scaling, key_mask=key_mask, **kwargs)
    got = reference_decode_attention(q, packed, scaling=scaling, softcap=kwargs["softcap"],
                                     sliding_window=kwargs["window"], key_mask=key_mask)
    assert got.shape == (B, H * group, q_len, D)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_accepts_transformers_masks():
    """Guards against a transformers 4-D mask (bool or additive, batch-broadcast) being read with the wrong
    polarity or shape: it must give the same result as the equivalent key mask."""
    k, v = _dense()
    B, H, N, D = k.shape
    q = torch.randn(B, 2 * H, 1, D)
    packed = pack_dense_kv(k, v, [8, 4], block_size=BS, value_group=8)
    key_mask = torch.ones(B, N, dtype=torch.bool)
    key_mask[0, :5] = False
    want = reference_decode_attention(q, packed, scaling=D**-0.5, key_mask=key_mask)
    bool_mask = key_mask.view(B, 1, 1, N)
    additive = torch.zeros(B, 1, 1, N).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    for mask in (bool_mask, additive):
        got = reference_decode_attention(q, packed, scaling=D**-0.5, attention_mask=mask)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_error_shrinks_with_more_bits():
    """Guards against a bit-width mix-up in the unpacking (e.g. 4-bit codes read as 8-bit): the output error
    against exact attention must fall from 2 to 4 to 8 bits, and 8 bits must be close."""
    k, v = _dense(N=6 * BS)
    q = torch.randn(2, 4, 1, k.shape[-1])
    exact = reference_decode_attention(q, pack_dense_kv(k, v, [16] * 6, block_size=BS, value_group=8),
                                       scaling=k.shape[-1] ** -0.5)
    errs = []
    for bits in (2, 4, 8):
        out = reference_decode_attention(q, pack_dense_kv(k, v, [bits] * 6, block_size=BS, value_group=8),
                                         scaling=k.shape[-1] ** -0.5)
        errs.append((out - exact).abs().max().item())
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.02, errs


def test_errors_name_the_problem():
    """Guards against silent garbage on mismatched inputs: wrong head count, key mask shape, block table
    naming a pool that does not exist."""
    k, v = _dense(H=2)
    packed = pack_dense_kv(k, v, [8], block_size=BS, value_group=8)
    with pytest.raises(ValueError, match="multiple of the layer's kv heads"):
        reference_decode_attention(torch.randn(2, 3, 1, 32), packed, scaling=1.0)
    with pytest.raises(ValueError, match="key_mask must be bool"):
        reference_decode_attention(torch.randn(2, 2, 1, 32), packed, scaling=1.0, key_mask=torch.ones(2, 5).bool())
    packed.block_bits[0] = 4
    with pytest.raises(ValueError, match="block_bits holds precisions"):
        reference_decode_attention(torch.randn(2, 2, 1, 32), packed, scaling=1.0)
