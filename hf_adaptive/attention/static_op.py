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
from hf_adaptive.kv.packed import PackedKV, PoolBook, QuantPool, resolve_static

_POOL_FIELDS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")


@torch.library.custom_op("hf_adaptive::static_packed_decode", mutates_args=())
def static_packed_decode(
    query: torch.Tensor, lengths: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor,
    history: list[torch.Tensor], book: torch.Tensor | None, book_blocks: int, pool_bits: list[int],
    key_mask: torch.Tensor | None, block_size: int, value_group: int, max_tokens: int, scaling: float, softcap: float,
) -> torch.Tensor:
    """(B, Hq, 1, D) attention of one decode query per sequence; see :func:`static_decode_attention`.

    ``history`` is [block_bits, block_slot, full_k, full_v, then the six tensors of each pool in ``pool_bits``], or
    empty when ``book`` (the view's address book, with its block table of ``book_blocks`` entries) locates them.
    """
    view = _unflatten(query, lengths, tail_k, tail_v, history, book, book_blocks, pool_bits, block_size,
                      value_group, max_tokens)
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
                            key_mask: torch.Tensor | None = None, tail_k: torch.Tensor | None = None,
                            tail_v: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention over a static packed view, traceable by ``torch.compile``.

    On CUDA a view with an address book (``packed.book``) hands the kernel the book instead of its pools, so the
    compiled step's inputs are the same few fixed tensors whatever storage the cache holds: a precision switch
    or a grown pool changes no input (no new guard, no CUDA-graph re-capture).

    Args:
        query: (B, Hq, 1, D) in the model dtype.
        packed: a static view (``packed.lengths`` set), e.g. from :class:`hf_adaptive.kv.static.AdaptiveStaticKVCache`.
        scaling: multiplier of q·k. softcap: Gemma-2 style score cap, or None.
        key_mask: optional (B, ``packed.max_tokens``) bool, True where a key may be attended (left padding).
        tail_k, tail_v: ``packed.tail_k`` / ``packed.tail_v`` as the caller already holds them (the key and value its
            cache layer returned). Under ``torch.compile`` a tensor read through two objects costs an aliasing guard
            evaluated before every step; None reads them from ``packed``.
    Returns:
        (B, Hq, 1, D) in the query's dtype.
    """
    if packed.lengths is None:
        raise ValueError("static_decode_attention needs a static view (packed.lengths set); got a dynamic one. "
                         "Fix: use hf_adaptive.attention.interface.decode_attention for dynamic views.")
    book = packed.book
    if book is not None and query.is_cuda and triton_decode.HAS_TRITON:
        history, entries, blocks, bits = [], book.entries, book.blocks, list(book.bits)
    else:
        bits = sorted(packed.pools)
        history = [packed.block_bits, packed.block_slot, packed.full_k, packed.full_v]
        history += [getattr(packed.pools[b], name) for b in bits for name in _POOL_FIELDS]
        entries, blocks = None, 0
    tail_k = packed.tail_k if tail_k is None else tail_k
    tail_v = packed.tail_v if tail_v is None else tail_v
    if not torch.compiler.is_compiling() and (tail_k is not packed.tail_k or tail_v is not packed.tail_v):
        # checked eagerly only: under compile the identity check would itself be the guard the arguments avoid
        raise ValueError("static_decode_attention: tail_k/tail_v must be the view's own tails (the key and value its "
                         "cache layer returned); got other tensors. Fix: pass the layer's key/value, or None.")
    return static_packed_decode(query, packed.lengths, tail_k, tail_v, history, entries, blocks, bits,
                                key_mask, packed.block_size, packed.value_group, packed.max_tokens, float(scaling),
                                float(softcap or 0.0))


def _unflatten(query, lengths, tail_k, tail_v, history, book, book_blocks, pool_bits, block_size, value_group,
               max_tokens) -> PackedKV:
    if book is not None:  # the kernel finds the table and the history through the book; no tensor stands for them
        empty, no_table = query.new_empty(0), book.new_empty(0)
        return PackedKV(block_size, value_group, no_table, no_table, empty, empty, tail_k, tail_v,
                        lengths=lengths, max_tokens=max_tokens, book=PoolBook(book, tuple(pool_bits), book_blocks))
    block_bits, block_slot, full_k, full_v, pool_tensors = *history[:4], history[4:]
    pools = {bits: QuantPool(bits, *pool_tensors[6 * i: 6 * i + 6]) for i, bits in enumerate(pool_bits)}
    return PackedKV(block_size, value_group, block_bits, block_slot, full_k, full_v, tail_k, tail_v, pools,
                    lengths=lengths, max_tokens=max_tokens)
