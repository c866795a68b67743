"""Build a :class:`~hf_adaptive.kv.packed.PackedKV` from dense keys/values, with a chosen block table.

Knows nothing about caches or transformers: it quantizes whole blocks with the layout's own KIVI
quantizers, places them in per-precision pools at permuted slots (so the block table really matters),
and keeps the last tokens as the exact tail. Used by tests, benchmarks and anyone who wants to feed
the attention kernels without a live cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_adaptive.kv.packed import PackedKV, QuantPool, quantize_keys, quantize_values, raise_if_bad_bits


def pack_dense_kv(
    keys: torch.Tensor,
    values: torch.Tensor,
    block_bits: Sequence[int],
    *,
    block_size: int = 64,
    value_group: int = 32,
    spare_slots: int = 1,
    seed: int = 0,
) -> PackedKV:
    """Pack (B, H, N, D) keys/values: ``len(block_bits)`` history blocks, the remaining tokens as tail.

    Args:
        keys, values: (B, H, N, D) in the model dtype, N >= len(block_bits) * block_size.
        block_bits: precision of each logical history block, each in (16, 8, 4, 2).
        block_size: tokens per history block.
        value_group: channels per value quantization group (must divide D).
        spare_slots: unused slots added to each pool (filled with random bytes), as a live cache has.
        seed: seed of the slot permutation and of the spare slots' contents.
    Returns:
        the packed layer; ``num_tokens == N``.
    """
    B, H, N, D = keys.shape
    n_blocks = len(block_bits)
    if n_blocks * block_size > N:
        raise ValueError(f"block_bits has {n_blocks} blocks of block_size={block_size} = {n_blocks * block_size} "
                         f"tokens but keys hold only N={N}; pass fewer blocks or more tokens.")
    if D % value_group:
        raise ValueError(f"value_group={value_group} must divide the head dim D={D}.")
    gen = torch.Generator().manual_seed(seed)
    slots = torch.zeros(n_blocks, dtype=torch.int32)
    full_k = full_v = keys.new_zeros(B, H, 0, D)
    pools = {}
    for bits in sorted(set(block_bits)):
        if bits != 16:
            raise_if_bad_bits(bits)
        idx = [i for i, b in enumerate(block_bits) if b == bits]
        perm = torch.randperm(len(idx) + spare_slots, generator=gen)[: len(idx)]
        slots[idx] = perm.to(torch.int32)
        k_rows, v_rows = _pool_rows(keys, values, idx, perm, len(idx) + spare_slots, block_size, gen)
        if bits == 16:
            full_k, full_v = k_rows, v_rows
        else:
            pools[bits] = _quant_pool(k_rows, v_rows, bits, block_size, value_group)
    dev = keys.device
    tail = slice(n_blocks * block_size, N)
    return PackedKV(block_size=block_size, value_group=value_group,
                    block_bits=torch.tensor(list(block_bits), dtype=torch.int32, device=dev),
                    block_slot=slots.to(dev), full_k=full_k, full_v=full_v,
                    tail_k=keys[:, :, tail].contiguous(), tail_v=values[:, :, tail].contiguous(), pools=pools)


def _pool_rows(keys, values, idx, perm, n_slots, block_size, gen):
    """(B, H, n_slots * block_size, D) pool contents: block idx[j] at slot perm[j], random spare slots."""
    B, H, _, D = keys.shape
    rows = torch.arange(block_size)
    src = (torch.tensor(idx, dtype=torch.long)[:, None] * block_size + rows).flatten().to(keys.device)
    dst = (perm.long()[:, None] * block_size + rows).flatten().to(keys.device)
    pools = []
    for x in (keys, values):
        pool = torch.randn(B, H, n_slots * block_size, D, generator=gen).to(x.dtype).to(x.device) \
            if n_slots > len(idx) else x.new_empty(B, H, n_slots * block_size, D)
        pools.append(pool.index_copy_(2, dst, x.index_select(2, src)))
    return pools


def _quant_pool(k_rows, v_rows, bits, block_size, value_group) -> QuantPool:
    kc, ks, kz = quantize_keys(k_rows, bits, block_size)
    vc, vs, vz = quantize_values(v_rows, bits, value_group)
    return QuantPool(bits=bits, k_codes=kc, k_scale=ks, k_zero=kz, v_codes=vc, v_scale=vs, v_zero=vz)
