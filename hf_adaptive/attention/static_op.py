"""Decode attention over a *static* packed view as one opaque custom op, so it runs inside ``torch.compile``.

Knows nothing about transformers. A static view (:class:`~hf_adaptive.kv.packed.PackedKV` with ``lengths``)
keeps capacity-sized tensors whose live extents are on the device, so the step it is read in can be captured
once and replayed (CUDA graphs). Dynamo cannot trace a Triton launch wrapped in host-side planning, so the
view is flattened into tensors and passed to ``hf_adaptive::static_packed_decode``: on CUDA the fused
kernel with ``DEVICE_LENS`` (no host reads), elsewhere the float32 reference (which reads the lengths).
"""

from __future__ import annotations

import torch

from hf_adaptive.attention import triton_decode
from hf_adaptive.attention.reference import reference_decode_attention
from hf_adaptive.kv.packed import PackedKV, QuantPool, resolve_static

_POOL_FIELDS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")


@torch.library.custom_op("hf_adaptive::static_packed_decode", mutates_args=())
def static_packed_decode(
    query: torch.Tensor, lengths: torch.Tensor, block_bits: torch.Tensor, block_slot: torch.Tensor,
    full_k: torch.Tensor, full_v: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor,
    pool_tensors: list[torch.Tensor], pool_bits: list[int], key_mask: torch.Tensor | None,
    block_size: int, value_group: int, max_tokens: int, scaling: float, softcap: float,
) -> torch.Tensor:
    """(B, Hq, 1, D) attention of one decode query per sequence; see :func:`static_decode_attention`."""
    view = _unflatten(lengths, block_bits, block_slot, full_k, full_v, tail_k, tail_v, pool_tensors, pool_bits,
                      block_size, value_group, max_tokens)
    cap = softcap if softcap > 0 else None
    if query.is_cuda and triton_decode.HAS_TRITON:
        return triton_decode.triton_decode_attention(query, view, scaling=scaling, softcap=cap, key_mask=key_mask)
    live = resolve_static(view)
    mask = None if key_mask is None else key_mask[:, : live.num_tokens]
    return reference_decode_attention(query, live, scaling=scaling, softcap=cap, key_mask=mask)


@static_packed_decode.register_fake
def _static_packed_decode_fake(query, *args, **kwargs) -> torch.Tensor:
    return torch.empty_like(query)


def static_decode_attention(query: torch.Tensor, packed: PackedKV, *, scaling: float, softcap: float | None = None,
                            key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention over a static packed view, traceable by ``torch.compile``.

    Args:
        query: (B, Hq, 1, D) in the model dtype.
        packed: a static view (``packed.lengths`` set), e.g. from :class:`hf_adaptive.kv.static.AdaptiveStaticKVCache`.
        scaling: multiplier of q·k. softcap: Gemma-2 style score cap, or None.
        key_mask: optional (B, ``packed.max_tokens``) bool, True where a key may be attended (left padding).
    Returns:
        (B, Hq, 1, D) in the query's dtype.
    """
    if packed.lengths is None:
        raise ValueError("static_decode_attention needs a static view (packed.lengths set); got a dynamic one. "
                         "Fix: use hf_adaptive.attention.interface.decode_attention for dynamic views.")
    bits = sorted(packed.pools)
    tensors = [getattr(packed.pools[b], name) for b in bits for name in _POOL_FIELDS]
    return static_packed_decode(query, packed.lengths, packed.block_bits, packed.block_slot, packed.full_k,
                                packed.full_v, packed.tail_k, packed.tail_v, tensors, bits, key_mask,
                                packed.block_size, packed.value_group, packed.max_tokens, float(scaling),
                                float(softcap or 0.0))


def _unflatten(lengths, block_bits, block_slot, full_k, full_v, tail_k, tail_v, pool_tensors, pool_bits,
               block_size, value_group, max_tokens) -> PackedKV:
    pools = {bits: QuantPool(bits, *pool_tensors[6 * i: 6 * i + 6]) for i, bits in enumerate(pool_bits)}
    return PackedKV(block_size, value_group, block_bits, block_slot, full_k, full_v, tail_k, tail_v, pools,
                    lengths=lengths, max_tokens=max_tokens)
