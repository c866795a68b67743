"""Storage mechanism of AdaptiveKVCache, driven directly through ``update`` with random bf16 K/V.

Shapes match real models (head_dim 64) so byte ratios are the ones users will see.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import LlamaConfig

from hf_adaptive.kv import packed
from hf_adaptive.kv.cache import AdaptiveKVCache
from hf_adaptive.kv.layer import AdaptiveFullLayer
from hf_adaptive.kv.pressure import ScriptedPressure
from hf_adaptive.kv.quantizers import TorchQuantizer
from hf_adaptive.policy.kv_policy import KVPolicyConfig

B, H, D = 1, 2, 64


def _config(layers: int = 2) -> LlamaConfig:
    return LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=H, head_dim=D,
                       num_hidden_layers=layers, intermediate_size=64, vocab_size=32)


def _kv(tokens: int, seed: int, batch: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, H, tokens, D, generator=g) * 2 + 0.5
    return k.to(torch.bfloat16), torch.randn(batch, H, tokens, D, generator=g).to(torch.bfloat16)


def _feed(cache: AdaptiveKVCache, chunks: list[int], seed: int = 0, batch: int = B):
    """Feed chunks of tokens through every layer; returns all K/V fed (B, H, L, D) and the last outputs."""
    ks, vs, out = [], [], None
    for i, n in enumerate(chunks):
        k, v = _kv(n, seed + i, batch)
        ks.append(k), vs.append(v)
        for layer_idx in range(len(cache.layers)):
            out = cache.update(k, v, layer_idx)
    return torch.cat(ks, -2), torch.cat(vs, -2), out


def _live_tensor_bytes(layer: AdaptiveFullLayer) -> int:
    """Independent count: numel * element_size of the tail and of the used slots' rows of every pool."""
    total = sum(t.numel() * t.element_size() for t in (layer.tail_keys, layer.tail_values))
    for bits, pool in layer.pools.items():
        used = [s for b, s in zip(layer.block_bits, layer.block_slot) if b == bits]
        if used:
            total += sum(t.numel() * t.element_size() for t in pool.read(used).values())
    return total


@pytest.mark.parametrize("bits,limit", [(8, 0.55), (4, 0.30)])
def test_bytes_ratio_and_accounting_cross_check(bits, limit):
    """Guards against byte accounting that forgets scales/zeros or the tail, and against ratio regressions.

    Length 8192 tokens, head_dim 64, bf16, residual_length 64, block_size 64, value_group 64.
    """
    cache = AdaptiveKVCache(_config(), fixed_bits=bits)
    _feed(cache, [4000, 4000, 189, 1, 1, 1])
    stats = cache.stats()
    assert cache.get_seq_length() == 8192
    for layer in cache.layers:
        assert layer.live_bytes() == _live_tensor_bytes(layer)
    assert stats["kv_bytes"] == sum(_live_tensor_bytes(layer) for layer in cache.layers)
    assert stats["bf16_equivalent_bytes"] == 2 * 8192 * B * H * D * 2 * 2
    assert stats["ratio"] <= limit, stats["ratio"]
    json.dumps(stats), json.dumps(cache.history)


def test_exact_tail_window_bounds():
    """Guards against the tail growing unbounded or dropping below residual_length (losing exactness)."""
    cache = AdaptiveKVCache(_config(1), fixed_bits=4, residual_length=64, block_size=64)
    sizes = []
    for step in range(300):
        _feed(cache, [1 if step else 70], seed=step)
        sizes.append(cache.layers[0].tail_keys.shape[-2])
    assert max(sizes) < 64 + 64 and min(sizes[1:]) >= 64 - 1 + 1 and min(sizes) >= 64


def test_packed_view_matches_update_output():
    """Guards against the kernel's view (pools + block table) disagreeing with the eager reference path."""
    cache = _mixed_cache()
    layer = cache.layers[0]
    assert {16, 8, 4} <= set(layer.block_bits) and layer.demotions["16->4"] > 0
    view = layer.packed_view()
    k_new, v_new = _kv(1, 99)
    k_out, v_out = cache.update(k_new, v_new, 0)
    k_ref, v_ref = _reconstruct(view)
    assert torch.equal(k_out[..., :-1, :], k_ref) and torch.equal(v_out[..., :-1, :], v_ref)


def _mixed_cache() -> AdaptiveKVCache:
    """History with 16-, 8- and 4-bit blocks, some demoted (slots out of order)."""
    cache = AdaptiveKVCache(_config(1), residual_length=16, block_size=16, policy=KVPolicyConfig(cooldown_steps=0),
                            pressure=ScriptedPressure([0.0] * 4 + [0.75] * 3 + [0.9] * 3 + [0.97] + [0.0]))
    _feed(cache, [40] + [16] * 12)
    return cache


def _reconstruct(view: packed.PackedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical K/V from a PackedKV, block by block (the slow obvious way)."""
    T, ks, vs = view.block_size, [], []
    for bits, slot in zip(view.block_bits.tolist(), view.block_slot.tolist()):
        rows = slice(slot * T, (slot + 1) * T)
        if bits == 16:
            ks.append(view.full_k[:, :, rows]), vs.append(view.full_v[:, :, rows])
            continue
        p = view.pools[bits]
        ks.append(packed.dequantize_keys(p.k_codes[:, :, rows], p.k_scale[:, :, slot:slot + 1],
                                         p.k_zero[:, :, slot:slot + 1], bits, T, view.tail_k.dtype))
        vs.append(packed.dequantize_values(p.v_codes[:, :, rows], p.v_scale[:, :, rows], p.v_zero[:, :, rows],
                                           bits, view.value_group, view.tail_k.dtype))
    return torch.cat(ks + [view.tail_k], -2), torch.cat(vs + [view.tail_v], -2)


class CountingQuantizer(TorchQuantizer):
    """The real torch quantizer, counting the tokens it quantizes."""

    def __init__(self):
        self.key_tokens = 0

    def quantize_keys(self, x, bits, block_size):
        self.key_tokens += x.shape[-2]
        return super().quantize_keys(x, bits, block_size)


def test_each_block_quantized_once_per_demotion():
    """Guards against transformers' QuantizedLayer bug: re-quantizing the whole history at every flush."""
    cache = AdaptiveKVCache(_config(1), residual_length=16, block_size=16,
                            pressure=ScriptedPressure([0.0] * 10 + [0.75] * 25 + [0.97] * 50))
    counter = CountingQuantizer()
    cache.context.quantizer = counter
    _feed(cache, [4] * 85)
    layer = cache.layers[0]
    quantized_blocks = sum(1 for b in layer.block_bits if b < 16)
    demoted_from_16_or_8 = sum(layer.demotions.values())
    flushed_quantized = quantized_blocks - layer.demotions["16->4"] - layer.demotions["16->8"]
    assert counter.key_tokens == 16 * (flushed_quantized + demoted_from_16_or_8)
    assert layer.demotions["16->4"] > 0 and layer.demotions["8->4"] > 0
    assert set(layer.block_bits) == {4}


def test_budget_moves_rungs_16_8_4_and_demotes():
    """Guards against a budget that never changes precision, or changes it in the wrong order."""
    per_token = 2 * H * D * 2 * 2  # bytes per token, 2 layers, bf16 K+V
    cache = AdaptiveKVCache(_config(), memory_budget=900 * per_token, residual_length=32, block_size=32)
    _feed(cache, [200] + [8] * 140)  # 8 tokens per forward step keeps the test fast
    bits = [h["bits"] for h in cache.history]
    firsts = [bits.index(b) for b in (16, 8, 4)]
    assert firsts == sorted(firsts), "rungs must go 16 -> 8 -> 4"
    stats = cache.stats()
    assert stats["demotions"].get("16->4", 0) > 0 and stats["switches"] >= 2
    assert cache.history[-1]["kv_bytes"] <= 900 * per_token
    assert stats["over_budget_steps"] == 0


def test_lossy_blocks_never_promoted_new_tokens_return_to_16():
    """Guards against promoting already-lossy data (impossible to undo) or staying at 4 bits after relief."""
    cache = AdaptiveKVCache(_config(1), residual_length=16, block_size=16,
                            pressure=ScriptedPressure([0.9] * 64 + [0.0] * 200))
    _feed(cache, [1] * 264)
    bits = cache.layers[0].block_bits
    assert bits[:2] == [4, 4] and bits[-1] == 16 and 4 not in bits[bits.index(16):]


def test_demotion_compacts_freed_pool():
    """Guards against demotion that frees nothing: emptied 16-bit pools must shrink."""
    cache = AdaptiveKVCache(_config(1), residual_length=16, block_size=16,
                            policy=KVPolicyConfig(demote_blocks_per_step=8),
                            pressure=ScriptedPressure([0.0] * 2 + [0.97] * 100))
    _feed(cache, [600, 1])
    before = cache.layers[0].reserved_bytes()
    _feed(cache, [1] * 6)
    assert cache.layers[0].pools[16].capacity < 8 and cache.layers[0].reserved_bytes() < 0.5 * before


def test_crop_within_tail_exact_and_beyond_is_flagged(caplog):
    """Guards against silent corruption when crop reaches quantized history (it must be counted and logged)."""
    cache = AdaptiveKVCache(_config(1), fixed_bits=4, residual_length=16, block_size=16)
    k_all, v_all, _ = _feed(cache, [100])
    tail = cache.layers[0].tail_keys.shape[-2]
    cache.crop(-(tail - 1))
    k_out, _ = cache.update(*_kv(1, 7), 0)
    assert cache.get_seq_length() == 100 - tail + 2 and cache.stats()["lossy_crop_tokens"] == 0
    assert torch.equal(k_out[..., 100 - tail, :], k_all[..., 100 - tail, :])
    with caplog.at_level(logging.WARNING, logger="hf_adaptive.kv.layer"):
        cache.crop(-20)
    assert cache.stats()["lossy_crop_tokens"] == 32 and "lossy" in caplog.text  # 18 tokens past a 2-token tail
    assert cache.get_seq_length() == 100 - tail + 2 - 20


def test_crop_into_16bit_history_is_exact():
    """Guards against crop losing data when the popped blocks are exact 16-bit blocks."""
    cache = AdaptiveKVCache(_config(1), residual_length=16, block_size=16)
    k_all, v_all, _ = _feed(cache, [100])
    cache.crop(-60)
    k_out, v_out = cache.update(*_kv(1, 5), 0)
    assert torch.equal(k_out[..., :40, :], k_all[..., :40, :]) and cache.stats()["lossy_crop_tokens"] == 0


def test_reorder_and_batch_ops_reach_quantized_pools():
    """Guards against beam reordering that permutes the tail but not the quantized history."""
    cache = AdaptiveKVCache(_config(1), fixed_bits=4, residual_length=16, block_size=16)
    _feed(cache, [90], batch=3)
    k_before, _ = cache.layers[0]._history()
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    k_after, _ = cache.layers[0]._history()
    assert torch.equal(k_after, k_before[[2, 0, 0]])
    cache.batch_select_indices(torch.tensor([0]))
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache.layers[0]._history()[0], k_before[[2, 2]])


def test_packed_view_read_by_attention_reference():
    """Guards against the cache and the kernel side (hf_adaptive.attention.reference) reading the contract
    differently: their dense reconstruction of our packed view must equal our eager output."""
    reference = pytest.importorskip("hf_adaptive.attention.reference")
    cache = _mixed_cache()
    view = cache.packed_view(0)
    k_ref, v_ref = reference.gather_packed_kv(view, torch.bfloat16)
    k_out, v_out = cache.update(*_kv(1, 99), 0)
    assert torch.equal(k_out[..., :-1, :], k_ref) and torch.equal(v_out[..., :-1, :], v_ref)


def test_book_table_groups_blocks_by_precision():
    """Guards the grouped walk's table: each precision's blocks in one run (16, 8, 4, 2), logical order inside a
    run, slots carried with their blocks, starts delimiting the runs and ending at the block count."""
    bits, slots = [4, 16, 8, 4, 2, 16], [0, 3, 1, 5, 2, 7]
    rows, starts = packed.book_table(bits, slots)
    assert rows[:2] == [bits, slots]
    assert rows[3] == [1, 5, 2, 0, 3, 4] and rows[2] == [3, 7, 1, 0, 5, 2]
    assert starts == [0, 2, 3, 5, 6]
    with pytest.raises(ValueError, match="not among"):
        packed.book_table([3], [0])


def test_book_refuses_storage_the_kernel_cannot_read_aligned():
    """Guards against misaligned reads: the kernel declares book addresses 16-byte aligned, so a pool that is an
    offset view of a larger tensor must be refused with a clear error, not read."""
    full = torch.zeros(1, 2, 64, D, dtype=torch.bfloat16)
    assert len(packed.book_entries(full, full.clone(), {})) == packed.BOOK_SIZE
    base = torch.zeros(1 * 2 * 64 * D + 1, dtype=torch.bfloat16)
    shifted = base[1:].view(1, 2, 64, D)  # 2 bytes past an aligned address
    with pytest.raises(ValueError, match="16-byte aligned"):
        packed.book_entries(shifted, full, {})
