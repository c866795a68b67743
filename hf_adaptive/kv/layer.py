"""One full-attention layer of the adaptive cache: block table + per-precision pools + exact tail.

Contract (see :mod:`hf_adaptive.kv.packed` for the layout): tokens live, in logical order, in history
blocks of ``block_size`` tokens (each at 16/8/4/2 bits, in the pool of its precision) followed by an
exact tail in the model dtype (``tail_keys`` / ``tail_values``). ``update`` appends to the tail, returns the full
keys/values (history dequantized and gathered by the block table, then the exact tail), and only then moves whole
cold blocks out of the tail (at the step's precision) and demotes old blocks, each block quantized once per demotion.
In packed-attention mode (``LayerContext.packed_decode``, decode steps only) ``update`` instead flushes and
demotes first, then returns handles marked with the packed view (``attach_packed_view``): no dequantization.
The decision (bits, demotions) comes from the shared :class:`LayerContext`, set once per step by the cache.

``keys`` / ``values`` keep transformers' ``DynamicLayer`` contract (the whole sequence, built only when read):
see :mod:`hf_adaptive.kv.sequence`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from transformers.cache_utils import DynamicLayer

from hf_adaptive.kv import packed
from hf_adaptive.kv.packed import attach_packed_view
from hf_adaptive.kv.config import KVCacheConfig
from hf_adaptive.kv.pools import BlockPool, PoolShape, to_device
from hf_adaptive.kv.quantizers import KVQuantizer
from hf_adaptive.kv.sequence import WholeSequence, tokens_to_crop
from hf_adaptive.policy.kv_policy import KVDecision, choose_demotions

logger = logging.getLogger(__name__)
COMPACT_BELOW_FRACTION = 0.5  # shrink a pool once less than half its slots are used


_UNBUILT = object()  # marks a gather index not built yet (None means "no gather needed")


@dataclass
class LayerContext:
    """State shared by all layers of one cache: settings, quantizer, this step's decision, side stream."""

    settings: KVCacheConfig
    quantizer: KVQuantizer
    decision: KVDecision = field(default_factory=lambda: KVDecision(0, 16, 0, False))
    side_streams: dict = field(default_factory=dict)
    packed_decode: bool = False  # this step's decode returns a packed-view handle (set by the cache per step)

    def side_stream(self, device: torch.device):
        """The CUDA stream demotions run on, or None (CPU, or side streams disabled)."""
        if device.type != "cuda" or not self.settings.side_stream:
            return None
        if device not in self.side_streams:
            self.side_streams[device] = torch.cuda.Stream(device=device)
        return self.side_streams[device]


class AdaptiveFullLayer(WholeSequence, DynamicLayer):
    """Full-attention layer: quantized history blocks + an exact tail (``tail_keys``/``tail_values``, (B, H, T, D)).

    ``keys`` / ``values`` are the whole sequence (B, H, seq_len, D), as for any ``DynamicLayer``; see
    :class:`~hf_adaptive.kv.sequence.WholeSequence`.
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, context: LayerContext):
        super().__init__()
        self.context = context
        self._clear()

    def _clear(self) -> None:
        self.tail_keys = self.tail_values = None
        self.is_initialized = False
        self.block_bits: list[int] = []
        self.block_slot: list[int] = []
        self.pools: dict[int, BlockPool] = {}
        self.shape: PoolShape | None = None
        self.demotions: Counter = Counter()
        self.lossy_crop_tokens = 0
        self._pending: tuple | None = None  # (cuda event, {bits: slots to release once it fired})
        self._gather: tuple | None = None  # cached (gather index or None, pool order, (2, N) int32 block table)
        self._full: tuple | None = None  # the cached whole sequence (WholeSequence); None when stale

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        group = min(self.context.settings.value_group, D)
        if D % group:
            raise ValueError(f"value_group={group} must divide the head dim {D}; got value_group="
                             f"{self.context.settings.value_group}. Fix: use a divisor of {D}, e.g. {D}.")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.shape = PoolShape(B, H, D, group, self.context.settings.block_size, self.dtype, self.device)
        self.tail_keys = key_states.new_zeros(B, H, 0, D)
        self.tail_values = value_states.new_zeros(B, H, 0, value_states.shape[-1])
        self.is_initialized = True

    # ------------------------------------------------------------------ per-step path
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append (B, H, q, D) states; return all keys/values (B, H, past + q, D) in logical order.

        In packed-attention mode, for q == 1, returns instead (key handle, value handle): views of the exact
        tail, the key marked with this layer's :class:`~hf_adaptive.kv.packed.PackedKV` (all past + 1 tokens)
        for ``attn_implementation="hf_adaptive"`` to read directly.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._sync_pending()
        self._full = None
        self.tail_keys = torch.cat([self.tail_keys, key_states], dim=-2)
        self.tail_values = torch.cat([self.tail_values, value_states], dim=-2)
        if self.context.packed_decode and key_states.shape[-2] == 1:
            return self._update_packed()
        history = self._history()
        if history is None:
            out = (self.tail_keys, self.tail_values)
        else:
            out = (torch.cat([history[0], self.tail_keys], -2), torch.cat([history[1], self.tail_values], -2))
        decision = self.context.decision
        self._flush_cold(decision.bits)
        if decision.demote_blocks:
            self.demote(decision.bits, decision.demote_blocks)
        return out

    def _update_packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode step in packed mode: flush/demote first, then hand out the view (it syncs the side stream)."""
        decision = self.context.decision
        self._flush_cold(decision.bits)
        if decision.demote_blocks:
            self.demote(decision.bits, decision.demote_blocks)
        view = self.packed_view()
        # fresh view objects (no copy) so the mark never sticks to the stored tail tensor itself
        tail_k, tail_v = self.tail_keys, self.tail_values
        return attach_packed_view(tail_k.view(tail_k.shape), view), tail_v.view(tail_v.shape)

    def _history(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Dequantized history (B, H, n_blocks * T, D) in logical order; O(length), vectorized."""
        if not self.block_bits:
            return None
        index, order = self._gather_index()
        parts = [self.pools[bits].dequantize(self.pools[bits].prefix(hw), self.dtype) for bits, hw in order]
        k = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], -2)
        v = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts], -2)
        if index is None:  # only 16-bit blocks, stored in order: no gather needed
            return k, v
        return k.index_select(-2, index), v.index_select(-2, index)

    def _gather_index(self, need_index: bool = True) -> tuple[torch.Tensor | None, list[tuple[int, int]]]:
        """Row index into the concatenated pool prefixes and the pool order, rebuilt only when the block table
        changed. The device block table is cached alongside; packed mode (``need_index=False``) never builds
        the dequantize index it does not read."""
        if self._gather is None:
            order = [(bits, pool.high_water) for bits, pool in sorted(self.pools.items(), reverse=True)
                     if pool.high_water]
            table = to_device(torch.tensor([self.block_bits, self.block_slot], dtype=torch.int32), self.device)
            self._gather = (_UNBUILT, order, table)
        index, order, table = self._gather
        if need_index and index is _UNBUILT:
            index = self._build_index(order)
            self._gather = (index, order, table)
        return index, order

    def _build_index(self, order: list[tuple[int, int]]) -> torch.Tensor | None:
        n = len(self.block_bits)
        if order == [(16, n)] and self.block_slot == list(range(n)):
            return None  # only 16-bit blocks, stored in order
        offsets, start = {}, 0
        for bits, hw in order:
            offsets[bits], start = start, start + hw
        starts = torch.tensor([offsets[b] + s for b, s in zip(self.block_bits, self.block_slot)])
        T = self.shape.block_size
        return to_device((starts.unsqueeze(1) * T + torch.arange(T)).flatten(), self.device)

    def _flush_cold(self, bits: int) -> None:
        """Move whole blocks leaving the exact window (beyond residual_length) into the pools at ``bits``."""
        settings = self.context.settings
        T, bs = self.tail_keys.shape[-2], settings.block_size
        if T < settings.residual_length + bs:
            return
        n = (T - settings.residual_length) // bs
        self._store_blocks(self.tail_keys[:, :, : n * bs], self.tail_values[:, :, : n * bs], bits)
        # clone: a view would keep the whole pre-flush tensor alive
        self.tail_keys = self.tail_keys[:, :, n * bs:].clone()
        self.tail_values = self.tail_values[:, :, n * bs:].clone()

    def _store_blocks(self, k: torch.Tensor, v: torch.Tensor, bits: int) -> None:
        n = k.shape[-2] // self.shape.block_size
        pool = self._pool(bits)
        slots = pool.alloc(n)
        pool.write(slots, self._encode(k, v, bits))
        self.block_bits += [bits] * n
        self.block_slot += slots
        self._gather = self._full = None

    def _encode(self, k: torch.Tensor, v: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
        if bits == 16:
            return {"k": k, "v": v}
        q, s = self.context.quantizer, self.shape
        kc, ks, kz = q.quantize_keys(k, bits, s.block_size)
        vc, vs, vz = q.quantize_values(v, bits, s.value_group)
        return {"k_codes": kc, "k_scale": ks, "k_zero": kz, "v_codes": vc, "v_scale": vs, "v_zero": vz}

    def _pool(self, bits: int) -> BlockPool:
        if bits not in self.pools:
            self.pools[bits] = BlockPool(bits, self.shape)
        return self.pools[bits]

    # ------------------------------------------------------------------ demotion
    def demote(self, target_bits: int, max_blocks: int) -> int:
        """Re-store up to ``max_blocks`` oldest blocks held above ``target_bits`` at ``target_bits``.

        16-bit blocks are quantized straight from the exact data; 8-bit ones go through their dequantized
        values (recorded as "8->4"). On CUDA the quantization runs on a side stream; the next read waits.
        Returns the number of blocks demoted.
        """
        chosen = choose_demotions(self.block_bits, target_bits, max_blocks)
        if not chosen:
            return 0
        self._sync_pending()
        dst = self._pool(target_bits)
        plan = []  # (src bits, logical indices, src slots, dst slots), all allocated on the main stream
        for src_bits in sorted({self.block_bits[i] for i in chosen}, reverse=True):
            idxs = [i for i in chosen if self.block_bits[i] == src_bits]
            plan.append((src_bits, idxs, [self.block_slot[i] for i in idxs], dst.alloc(len(idxs))))
        stream = self.context.side_stream(self.device)
        self._run_demotions(plan, dst, stream)
        for src_bits, idxs, _, dst_slots in plan:
            for i, slot in zip(idxs, dst_slots):
                self.block_bits[i], self.block_slot[i] = target_bits, slot
            self.demotions[f"{src_bits}->{target_bits}"] += len(idxs)
        self._gather = self._full = None
        return len(chosen)

    def _run_demotions(self, plan: list, dst: BlockPool, stream) -> None:
        releases = {src_bits: src_slots for src_bits, _, src_slots, _ in plan}
        if stream is None:
            for src_bits, _, src_slots, dst_slots in plan:
                self._demote_blocks(self.pools[src_bits], src_slots, dst, dst_slots)
            for bits, slots in releases.items():
                self.pools[bits].release(slots)
            return
        # side stream: wait for the main stream's writes, keep pools alive, signal completion with an event
        stream.wait_stream(torch.cuda.current_stream(self.device))
        for pool in {id(p): p for p in [dst, *(self.pools[b] for b in releases)]}.values():
            pool.record_stream(stream)
        with torch.cuda.stream(stream):
            for src_bits, _, src_slots, dst_slots in plan:
                self._demote_blocks(self.pools[src_bits], src_slots, dst, dst_slots)
            event = torch.cuda.Event()
            event.record(stream)
        self._pending = (event, releases)  # source slots stay reserved until the event fired

    def _demote_blocks(self, src: BlockPool, src_slots: list[int], dst: BlockPool, dst_slots: list[int]) -> None:
        k, v = src.dequantize(src.read(src_slots), self.dtype)
        dst.write(dst_slots, self._encode(k, v, dst.bits))

    def _sync_pending(self) -> None:
        """Make the current stream wait for queued demotions, then free their source slots and compact."""
        if self._pending is not None:
            event, releases = self._pending
            torch.cuda.current_stream(self.device).wait_event(event)
            for bits, slots in releases.items():
                self.pools[bits].release(slots)
            self._pending = None
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        for bits, pool in self.pools.items():
            if pool.capacity >= 8 and pool.used < COMPACT_BELOW_FRACTION * pool.capacity:
                mapping = pool.compact()
                self.block_slot = [mapping[s] if b == bits else s for b, s in zip(self.block_bits, self.block_slot)]
                self._gather = None

    # ------------------------------------------------------------------ transformers Cache API
    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return len(self.block_bits) * self.shape.block_size + self.tail_keys.shape[-2]

    def reset(self) -> None:
        """Drop all tokens and pools (the layer is re-initialized by the next update)."""
        self._sync_pending()
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative int, as for transformers' ``DynamicLayer``;
        a positive value raises ``ValueError``, as there).

        Cropping within the exact tail (at most ``residual_length`` tokens right after a flush) is exact.
        Cropping deeper pops whole history blocks back into the tail first: exact for 16-bit blocks,
        *lossy* for quantized ones (their dequantized values become the tail); counted in
        ``lossy_crop_tokens`` and logged as a warning, never silent.
        """
        remove = min(tokens_to_crop(tokens_to_remove), self.get_seq_length())
        if remove == 0:
            return
        self._sync_pending()
        self._full = None
        while self.tail_keys.shape[-2] < remove:
            self._pop_block()
        keep = self.tail_keys.shape[-2] - remove
        self.tail_keys, self.tail_values = self.tail_keys[:, :, :keep], self.tail_values[:, :, :keep]

    def _pop_block(self) -> None:
        bits, slot = self.block_bits.pop(), self.block_slot.pop()
        pool = self.pools[bits]
        k, v = pool.dequantize(pool.read([slot]), self.dtype)
        pool.release([slot])
        self.tail_keys, self.tail_values = torch.cat([k, self.tail_keys], -2), torch.cat([v, self.tail_values], -2)
        self._gather = None
        self._note_lossy_pop(bits)

    def _note_lossy_pop(self, bits: int) -> None:
        if bits < 16:
            self.lossy_crop_tokens += self.shape.block_size
            logger.warning("crop reached a %d-bit history block: its %d tokens return to the exact tail "
                           "dequantized (lossy). Keep crops within residual_length=%d to stay exact.",
                           bits, self.shape.block_size, self.context.settings.residual_length)

    def _apply_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.is_initialized:
            return
        self._sync_pending()
        self.tail_keys, self.tail_values = fn(self.tail_keys), fn(self.tail_values)
        for pool in self.pools.values():
            pool.apply_batch(fn)
        self.shape = replace(self.shape, batch=self.tail_keys.shape[0])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: batch row i becomes old row ``beam_idx[i]`` (tail and every pool)."""
        self._batch_op(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times in place (tail and every pool)."""
        self._batch_op(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (tail and every pool)."""
        self._batch_op(lambda t: t[indices, ...])

    def _batch_op(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._full = None  # rows moved: the cached whole sequence is stale
        self._apply_batch(fn)

    # ------------------------------------------------------------------ kernel view and accounting
    def packed_view(self) -> packed.PackedKV:
        """The layer in the packed layout (pool prefixes are views, no dequantized copy)."""
        if not self.is_initialized:
            raise ValueError("packed_view() needs at least one update(); this layer holds no tokens yet. "
                             "Fix: run a forward pass with the cache first.")
        self._sync_pending()
        _, order = self._gather_index(need_index=False)
        hw = dict(order)
        B, H, _, D = self.tail_keys.shape
        full = self.pools.get(16)
        if full is not None and hw.get(16):
            view = full.prefix(hw[16])
            full_k, full_v = view["k"], view["v"]
        else:
            full_k = full_v = self.tail_keys.new_zeros(B, H, 0, D)
        pools = {bits: self.pools[bits].as_quant_pool(n) for bits, n in order if bits != 16}
        table = self._gather[2]  # cached with the gather index: rebuilt only when the block table changes
        return packed.PackedKV(self.shape.block_size, self.shape.value_group, table[0], table[1],
                               full_k, full_v, self.tail_keys, self.tail_values, pools)

    def live_bytes(self) -> int:
        """Bytes of what is live: exact tail + used pool slots (codes, scales and zeros included)."""
        if not self.is_initialized:
            return 0
        return tensor_bytes(self.tail_keys, self.tail_values) + sum(pool.live_bytes() for pool in self.pools.values())

    def reserved_bytes(self) -> int:
        """Bytes allocated: exact tail + whole pools (free slots included)."""
        if not self.is_initialized:
            return 0
        pools = sum(pool.reserved_bytes() for pool in self.pools.values())
        return tensor_bytes(self.tail_keys, self.tail_values) + pools

    def demotable_above(self, bits: int) -> int:
        """History blocks still stored above ``bits``."""
        return sum(1 for b in self.block_bits if b > bits)

    def stats(self) -> dict:
        """JSON-serializable per-layer telemetry."""
        tokens = {str(b): 0 for b in (16, 8, 4, 2)}
        bs = self.shape.block_size if self.shape else 0
        for b in self.block_bits:
            tokens[str(b)] += bs
        tail = self.tail_keys.shape[-2] if self.is_initialized else 0
        tokens["16"] += tail
        return {"type": "full_attention", "tokens": self.get_seq_length(), "tokens_by_bits": tokens,
                "tail_tokens": tail, "blocks": len(self.block_bits), "live_bytes": self.live_bytes(),
                "reserved_bytes": self.reserved_bytes(), "bf16_bytes": bf16_bytes(self),
                "demotions": dict(self.demotions), "lossy_crop_tokens": self.lossy_crop_tokens}


def bf16_bytes(layer) -> int:
    """What the layer's stored tokens would take as bf16 keys + values (the comparison baseline)."""
    if not layer.is_initialized:
        return 0
    if isinstance(layer, AdaptiveFullLayer):  # shapes from the tail: never build the whole sequence for them
        k, v, stored = layer.tail_keys, layer.tail_values, layer.get_seq_length()
    else:
        k, v = layer.keys, layer.values
        stored = k.shape[-2]
    B, H, _, D = k.shape
    return stored * B * H * (D + v.shape[-1]) * 2


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)
