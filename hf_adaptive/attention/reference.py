"""Plain-torch attention over the packed KV layout: the CPU path and the oracle of the fused kernel.

Knows nothing about transformers. It dequantizes every pool of a :class:`~hf_adaptive.kv.packed.PackedKV`,
gathers the history blocks in logical order through the block table, appends the exact tail, and runs
float32 softmax attention with GQA, scaling, optional softcap, sliding window, key mask and the causal
alignment of the last ``q_len`` positions. The gather is done with device-side index arithmetic, so it
adds no host syncs.
"""

from __future__ import annotations

import logging

import torch

from hf_adaptive.kv.packed import QUANT_BITS, PackedKV, dequantize_keys, dequantize_values

logger = logging.getLogger(__name__)


def gather_packed_kv(packed: PackedKV, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize a packed layer into dense keys/values in logical token order.

    Args:
        packed: the layer (N = ``packed.num_tokens`` tokens).
        dtype: dtype of the result.
    Returns:
        keys, values: (B, H, N, D) in ``dtype``, history blocks in logical order followed by the tail.
    """
    _check_block_table(packed)
    bs = packed.block_size
    pools_k, pools_v, offsets = [packed.full_k.to(dtype)], [packed.full_v.to(dtype)], {16: 0}
    rows = packed.full_k.shape[-2]
    for bits in sorted(packed.pools):
        p = packed.pools[bits]
        offsets[bits] = rows
        pools_k.append(dequantize_keys(p.k_codes, p.k_scale, p.k_zero, bits, bs, dtype))
        pools_v.append(dequantize_values(p.v_codes, p.v_scale, p.v_zero, bits, packed.value_group, dtype))
        rows += p.k_codes.shape[-2]
    # one row index per history token: pool offset of its block's precision + slot * block_size + i
    bits = packed.block_bits.long()
    base = torch.zeros_like(bits)
    for b, off in offsets.items():
        base = torch.where(bits == b, off, base)
    idx = (base + packed.block_slot.long() * bs)[:, None] + torch.arange(bs, device=bits.device)
    idx = idx.flatten()
    hist_k = torch.cat(pools_k, dim=-2).index_select(-2, idx)
    hist_v = torch.cat(pools_v, dim=-2).index_select(-2, idx)
    keys = torch.cat([hist_k, packed.tail_k.to(dtype)], dim=-2)
    values = torch.cat([hist_v, packed.tail_v.to(dtype)], dim=-2)
    return keys, values


def reference_decode_attention(
    query: torch.Tensor,
    packed: PackedKV,
    *,
    scaling: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    key_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of the last ``q_len`` positions over a packed layer, computed in float32.

    Args:
        query: (B, Hq, q_len, D); query i sits at position N - q_len + i (N = ``packed.num_tokens``),
            Hq a multiple of the layer's kv heads H (GQA).
        packed: the layer's keys/values.
        scaling: multiplier of q·k.
        softcap: if set, scores become ``softcap * tanh(score / softcap)``.
        sliding_window: if set, query at position p sees keys in (p - sliding_window, p].
        key_mask: optional (B, N) bool, True where a key may be attended (e.g. not left padding).
        attention_mask: optional transformers mask (B or 1, 1 or Hq, q_len, N), bool (True = attend) or
            additive float; it replaces the causal rule (transformers' masks already contain it).
    Returns:
        (B, Hq, q_len, D) in the query's dtype. Rows with no visible key are zeros.
    """
    check_packed_query(query, packed, key_mask)
    keys, values = gather_packed_kv(packed, torch.float32)
    return dense_attention(query, keys, values, scaling=scaling, softcap=softcap, sliding_window=sliding_window,
                           key_mask=key_mask, attention_mask=attention_mask)


def dense_attention(query, keys, values, *, scaling: float, softcap: float | None = None,
                    sliding_window: int | None = None, key_mask: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """float32 GQA attention over dense (B, H, N, D) keys/values; arguments as :func:`reference_decode_attention`."""
    B, Hq, L, D = query.shape
    H, N = keys.shape[1], keys.shape[2]
    q = query.float().view(B, H, Hq // H, L, D)
    scores = torch.einsum("bhgld,bhnd->bhgln", q, keys.float()) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = _additive_mask(query, N, sliding_window, key_mask, attention_mask)
    heads = (H, Hq // H) if mask.shape[1] == Hq else (1, 1)
    scores = scores + mask.view(mask.shape[0], *heads, L, N)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows -> NaN -> zeros
    out = torch.einsum("bhgln,bhnd->bhgld", probs, values.float())
    return out.reshape(B, Hq, L, D).to(query.dtype)


def _additive_mask(query, n_keys, sliding_window, key_mask, attention_mask) -> torch.Tensor:
    """(B|1, H|1, L, N) float32 additive mask: 0 where attended, -inf elsewhere."""
    B, Hq, L, _ = query.shape
    dev = query.device
    if attention_mask is None:
        q_pos = torch.arange(n_keys - L, n_keys, device=dev)[:, None]
        k_pos = torch.arange(n_keys, device=dev)[None, :]
        allow = k_pos <= q_pos
        if sliding_window:
            allow = allow & (k_pos > q_pos - sliding_window)
        mask = torch.zeros(1, 1, L, n_keys, device=dev).masked_fill(~allow, float("-inf"))
    else:
        mask = _hf_mask_to_additive(attention_mask, query, n_keys)
        if sliding_window:
            k_pos = torch.arange(n_keys, device=dev)
            outside = (k_pos <= torch.arange(n_keys - L, n_keys, device=dev)[:, None] - sliding_window)
            mask = mask.masked_fill(outside, float("-inf"))
    if key_mask is not None:
        mask = torch.where(key_mask.view(B, 1, 1, n_keys), mask, float("-inf"))
    if mask.shape[1] not in (1, Hq):
        raise ValueError(f"attention_mask has {mask.shape[1]} heads; expected 1 or the {Hq} query heads.")
    return mask


def _hf_mask_to_additive(attention_mask: torch.Tensor, query: torch.Tensor, n_keys: int) -> torch.Tensor:
    if attention_mask.dim() != 4 or attention_mask.shape[-1] != n_keys or attention_mask.shape[-2] != query.shape[2]:
        raise ValueError(
            f"attention_mask must be (B, 1|Hq, q_len={query.shape[2]}, N={n_keys}) for a layer of N tokens; got "
            f"{tuple(attention_mask.shape)}. The cache's get_mask_sizes() must report the packed layer's length.")
    if attention_mask.dtype == torch.bool:
        return torch.zeros(attention_mask.shape, device=query.device).masked_fill(~attention_mask, float("-inf"))
    return attention_mask.float()


def check_packed_query(query: torch.Tensor, packed: PackedKV, key_mask: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the mismatch if ``query``/``packed``/``key_mask`` cannot go together."""
    if query.dim() != 4:
        raise ValueError(f"query must be (B, Hq, q_len, D); got shape {tuple(query.shape)}.")
    B, Hq, _, D = query.shape
    tb, H, _, td = packed.tail_k.shape
    if tb != B or td != D:
        raise ValueError(f"query (B={B}, D={D}) does not match the packed layer's tail_k {tuple(packed.tail_k.shape)}"
                         f" (B, H, T, D); pass the query of the same layer and batch.")
    if Hq % H:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of the layer's kv heads H={H} (GQA).")
    if D % packed.value_group:
        raise ValueError(f"value_group={packed.value_group} must divide head dim D={D}.")
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, packed.num_tokens)):
        raise ValueError(f"key_mask must be bool (B={B}, N={packed.num_tokens}); got {key_mask.dtype} "
                         f"{tuple(key_mask.shape)}.")
    for bits, pool in packed.pools.items():
        if pool.k_codes.shape[-1] != D * bits // 8:
            raise ValueError(f"pools[{bits}].k_codes last dim is {pool.k_codes.shape[-1]}; expected D*bits/8="
                             f"{D * bits // 8} for D={D}.")


def _check_block_table(packed: PackedKV) -> None:
    if packed.block_bits.shape != packed.block_slot.shape or packed.block_bits.dim() != 1:
        raise ValueError(f"block_bits {tuple(packed.block_bits.shape)} and block_slot "
                         f"{tuple(packed.block_slot.shape)} must be the same 1-D (N,) shape.")
    if packed.block_bits.device.type == "cpu":  # checking values costs a sync on GPU, nothing on CPU
        present = {16, *packed.pools}
        seen = set(packed.block_bits.unique().tolist())
        if not seen <= present:
            raise ValueError(f"block_bits holds precisions {sorted(seen)} but only {sorted(present)} have pools "
                             f"(allowed: 16 and {QUANT_BITS}); the block table and pools disagree.")
