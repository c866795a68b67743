"""One full-attention layer of :class:`~hf_adaptive.kv.static.AdaptiveStaticKVCache`: static shapes for compiled decode.

Contract: the storage of :class:`~hf_adaptive.kv.layer.AdaptiveFullLayer` (block table, per-precision pools, exact
tail) with a preallocated tail, capacity-sized pools and a device copy of the block table, so the decode step the
compiled region runs is a fixed set of tensor ops. What a layer needs from its cache arrives in a
:class:`StaticContext` (sizes, the device lengths all layers share, the step flag, notifications back); a layer
never holds its cache.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from hf_adaptive.kv import packed
from hf_adaptive.kv.layer import AdaptiveFullLayer, LayerContext
from hf_adaptive.kv.pools import BlockPool, to_device
from hf_adaptive.kv.sequence import tokens_to_crop

logger = logging.getLogger(__name__)


_QUANT_FIELDS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
MIN_POOL_SLOTS = 2  # placeholder / smallest pool: dynamo specializes extents of 0 and 1, so never use them


class CacheFullError(IndexError, ValueError):
    """A forward would store more than ``max_cache_len`` tokens per sequence. An ``IndexError``, as transformers'
    ``StaticCache`` raises there, and a ``ValueError``, as for any other bad size."""


def check_room(max_cache_len: int, stored: int, incoming: int) -> None:
    """Raise :class:`CacheFullError` if ``stored + incoming`` tokens do not fit in ``max_cache_len``."""
    reached = stored + incoming
    if reached <= max_cache_len:
        return
    raise CacheFullError(
        f"AdaptiveStaticKVCache holds at most max_cache_len={max_cache_len} tokens per sequence; this forward would "
        f"bring it to {reached} ({stored} stored + {incoming} new), so nothing was stored. Fix: build the cache with "
        f"max_cache_len >= prompt length + max_new_tokens (at least {reached} here), lower max_new_tokens, or "
        "crop() / reset() the cache before reusing it.")


def _mark_static(t: torch.Tensor) -> None:
    # fixed addresses: CUDA-graph replays read them in place instead of copying them in every step
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(t)


def _mark_pool(t: torch.Tensor) -> None:
    """A pool tensor the compiled step reads: static address, dynamic extent (dim 2: rows or slots), so a pool
    of another capacity (a placeholder replaced by the real pool) reuses the traced graph."""
    _mark_static(t)
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_dynamic(t, 2)


class StaticLengths:
    """Device-side extents shared by every layer: ``lens`` int32 [history blocks, tail tokens], ``seen`` int64
    scalar (tokens stored: what ``get_seq_length`` reports inside the graph).

    At the start of a step they hold the committed counts; the step itself advances them (layer 0's ``update``
    adds the step's tokens, inside the compiled region), so a decode step that moves no block costs the host
    no device write. The host rewrites them only after it changed the block table or the tail (:meth:`set`).
    """

    def __init__(self, device: torch.device):
        self.lens = torch.zeros(2, dtype=torch.int32, device=device)
        self.seen = torch.zeros((), dtype=torch.int64, device=device)
        _mark_static(self.lens)
        _mark_static(self.seen)

    def set(self, n_blocks: int, n_tail: int, seen: int) -> None:
        """Scalar fills: kernel arguments, no host-to-device copy and no sync."""
        self.lens[0].fill_(n_blocks)
        self.lens[1].fill_(n_tail)
        self.seen.fill_(seen)

    def advance(self, q: int) -> None:
        """This step's ``q`` tokens are being written (device ops; traced into the compiled step)."""
        self.lens[1:].add_(q)
        self.seen.add_(q)


@dataclass
class StaticContext:
    """What a static layer needs from its cache, and nothing else of it.

    Attributes:
        max_cache_len: most tokens per sequence.
        n_layers: layers in the cache (a pool's share of a memory budget; the last layer publishes lengths).
        lowest_bits: the lowest precision the policy can reach (its pool is never capped by the budget).
        view_bits: the quantized precisions a view holds a pool (or placeholder) for.
        packed_decode_enabled: whether a decode step reads the packed view now (the model's attention).
        on_host_change: a layer changed its block table, pools, tail or pending demotions.
        on_view_change: a layer's view now holds other pools (its address book was rewritten).
        publish_lengths: write the committed counts to the device lengths.
        lengths: the device lengths every layer shares (made by the first layer that initializes).
        hooked_step: True between the step hooks of a forward (the host work of this step is done).
    """

    max_cache_len: int
    n_layers: int
    packed_decode_enabled: Callable[[], bool]
    on_host_change: Callable[[], None]
    on_view_change: Callable[[], None]
    publish_lengths: Callable[[], None]
    lowest_bits: int = 16
    view_bits: tuple[int, ...] = ()
    lengths: StaticLengths | None = None
    hooked_step: bool = False

    def lengths_for(self, device: torch.device) -> StaticLengths:
        if self.lengths is None:
            self.lengths = StaticLengths(device)
        return self.lengths


class StaticAdaptiveLayer(AdaptiveFullLayer):
    """Full-attention layer with a preallocated tail, capacity-sized pools and a device block table."""

    is_compileable = True

    def __init__(self, context: LayerContext, static: StaticContext, index: int):
        self.static = static
        self.index = index  # position in the cache: layer 0 advances the shared device lengths
        super().__init__(context)

    # The live tail as ``tail_keys`` / ``tail_values`` (the parent's accounting and eager paths read them): a slice
    # of the preallocated tail, built only when read, since the per-step host work runs while the GPU waits for it.
    # ``keys`` / ``values`` (the whole sequence) are the parent's, built only when read.
    @property
    def tail_keys(self):
        return self.tail_k[:, :, : self.n_tail] if self._tail_backed else self._tail_keys

    @tail_keys.setter
    def tail_keys(self, value) -> None:
        self._tail_keys = value

    @property
    def tail_values(self):
        return self.tail_v[:, :, : self.n_tail] if self._tail_backed else self._tail_values

    @tail_values.setter
    def tail_values(self, value) -> None:
        self._tail_values = value

    def _clear(self) -> None:
        self._tail_backed = False
        super()._clear()
        self.n_tail = 0  # tokens in the tail, committed (written)
        self.prepared = 0  # tokens the hooks made room for in this forward (written by update, committed after)
        self.view: packed.PackedKV | None = None
        self._view_key: tuple | None = None
        self._table_dirty = False  # host block table changed since the device copy was written
        self._placeholders: dict[int, BlockPool] = {}  # stand-ins for pools not allocated (yet)

    # every change of the host block table goes through one of these: mark the device copy stale
    def _store_blocks(self, k: torch.Tensor, v: torch.Tensor, bits: int) -> None:
        super()._store_blocks(k, v, bits)
        self._table_dirty = True
        self.static.on_host_change()

    def demote(self, target_bits: int, max_blocks: int) -> int:
        n = super().demote(target_bits, max_blocks)
        self._table_dirty = self._table_dirty or n > 0
        if n:
            self.static.on_host_change()
        return n

    @property
    def capacity_blocks(self) -> int:
        return math.ceil(self.static.max_cache_len / self.context.settings.block_size)

    @property
    def tail_capacity(self) -> int:
        s = self.context.settings
        return s.residual_length + s.block_size

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        B, H, _, D = key_states.shape
        self.tail_k = key_states.new_zeros(B, H, self.tail_capacity, D)
        self.tail_v = value_states.new_zeros(B, H, self.tail_capacity, value_states.shape[-1])
        # the address book: pool pointers and strides, then the block table (rows, group starts; packed.book_table)
        # in one tensor, so a layer's history is one input of the compiled step
        cap = self.capacity_blocks
        self.book = torch.zeros(packed.book_length(cap), dtype=torch.int64, device=self.device)
        self.table = self.book[packed.BOOK_SIZE: packed.BOOK_SIZE + packed.BOOK_TABLE_ROWS * cap].view(-1, cap)
        self.group_starts = self.book[packed.BOOK_SIZE + packed.BOOK_TABLE_ROWS * cap:]
        for t in (self.tail_k, self.tail_v, self.book):
            _mark_static(t)
        self._tail_backed = True
        self._set_row_bytes()
        self._lens = self.static.lengths_for(self.device).lens  # read directly by the compiled step (one guard)

    def drop_tokens(self) -> None:
        """Forget every token but keep the buffers (tail, block table, pools) at their addresses."""
        if not self.is_initialized:
            return
        self._sync_pending()
        for pool in self.pools.values():
            pool.release([slot for slot in range(pool.capacity) if slot not in set(pool.free)])
        self.block_bits, self.block_slot = [], []
        self.n_tail = self.prepared = 0
        self.demotions.clear()
        self.lossy_crop_tokens = 0
        self._gather = self._full = None
        self._table_dirty = False
        self.group_starts.zero_()  # no block in any precision group
        self._refresh_view()

    def _fits(self, key_states: torch.Tensor) -> bool:
        """Whether the preallocated buffers take these states (batch, heads, head dim, dtype, device)."""
        t = self.tail_k
        return (key_states.shape[0], key_states.shape[1], key_states.shape[-1]) == (t.shape[0], t.shape[1], t.shape[-1]) \
            and key_states.dtype == t.dtype and key_states.device == t.device

    def _set_row_bytes(self) -> None:
        self._row_bytes = (self.tail_k[:, :, :1].numel() * self.tail_k.element_size()
                           + self.tail_v[:, :, :1].numel() * self.tail_v.element_size())

    def live_bytes(self) -> int:
        """Exact tail rows + used pool slots, from counters (no tensor work: it runs every step)."""
        if not self.is_initialized:
            return 0
        return self.n_tail * self._row_bytes + sum(pool.live_bytes() for pool in self.pools.values())

    # ------------------------------------------------------------------ per-step path
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Decode (hooks prepared the step): write the new row, return the tail marked with the static view.
        Otherwise (prefill, or no hooks, eager only): store everything now and return exact dense keys/values."""
        if torch.compiler.is_compiling():
            return self._update_compiled(key_states, value_states)
        if not self.is_initialized or (not self.block_bits and not self.n_tail and not self._fits(key_states)):
            self._clear()
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if q == 1 and not self.prepared and self.context.packed_decode:
            return self._decode_unhooked(key_states, value_states)
        if self.prepared and self.prepared == q:
            if self.index == 0:
                self.static.lengths.advance(q)
            self.tail_k[:, :, self.n_tail: self.n_tail + q].copy_(key_states)
            self.tail_v[:, :, self.n_tail: self.n_tail + q].copy_(value_states)
            if q == 1 and self.context.packed_decode:
                return self._handles()
            return self._dense(self.n_tail + q)
        return self._update_unprepared(key_states, value_states)

    def _update_compiled(self, key_states: torch.Tensor, value_states: torch.Tensor):
        # Every Python value read here becomes a guard that dynamo evaluates before each step, for each layer: the
        # first layer checks the step once for all, and the others read only their own tensors.
        if self.index == 0:
            self._check_compiled_step(key_states)
            self.static.lengths.advance(1)  # the first layer of the step advances the shared lengths for every layer
        pos = (self._lens[1:2] - 1).long()  # this step's row
        self.tail_k.index_copy_(2, pos, key_states)
        self.tail_v.index_copy_(2, pos, value_states)
        return self.tail_k, self.tail_v

    def _check_compiled_step(self, key_states: torch.Tensor) -> None:
        if not self.context.packed_decode:
            raise ValueError("AdaptiveStaticKVCache: a compiled decode step must read the cache through "
                             "attn_implementation='hf_adaptive'. Fix: hf_adaptive.enable_fused_attention(model).")
        if not self.is_initialized or key_states.shape[-2] != 1 or not self.static.hooked_step:
            raise ValueError("AdaptiveStaticKVCache: a compiled forward must be a decode step (q_len 1) after an "
                             "eager prefill, with the step hooks installed. Fix: call "
                             "hf_adaptive.enable_fused_attention(model) before generate.")

    def _decode_unhooked(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Eager decode without the step hooks (the cache's own per-step bookkeeping ran): the hooks' work for this
        layer, then the same write and static view, so every decode step reads the view its mask was sized for."""
        self.prepare(1)
        self.tail_k[:, :, self.n_tail: self.n_tail + 1].copy_(key_states)
        self.tail_v[:, :, self.n_tail: self.n_tail + 1].copy_(value_states)
        n_blocks = len(self.block_bits)
        self.static.lengths.set(n_blocks, self.n_tail + 1, n_blocks * self.shape.block_size + self.n_tail + 1)
        self.commit()
        return self._handles()

    def _handles(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tail_k, self.tail_v

    def _dense(self, n_tail: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact tail (first ``n_tail`` rows) after the dequantized history: (B, H, N, D)."""
        k, v = self.tail_k[:, :, :n_tail], self.tail_v[:, :, :n_tail]
        history = self._history()
        if history is None:
            return k, v
        return torch.cat([history[0], k], -2), torch.cat([history[1], v], -2)

    def _update_unprepared(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Append any number of tokens: exact output first, then whole cold blocks go to the pools."""
        check_room(self.static.max_cache_len, self.get_seq_length(), key_states.shape[-2])
        self._sync_pending()
        k = torch.cat([self.tail_k[:, :, : self.n_tail], key_states], -2)
        v = torch.cat([self.tail_v[:, :, : self.n_tail], value_states], -2)
        history = self._history()
        out = (k, v) if history is None else (torch.cat([history[0], k], -2), torch.cat([history[1], v], -2))
        s = self.context.settings
        n = max(0, k.shape[-2] - s.residual_length) // s.block_size
        if k.shape[-2] > self.tail_capacity - 1 and n:  # keep one free row for the next decode step
            self._store_blocks(k[:, :, : n * s.block_size], v[:, :, : n * s.block_size], self.context.decision.bits)
            k, v = k[:, :, n * s.block_size:], v[:, :, n * s.block_size:]
        self.tail_k[:, :, : k.shape[-2]].copy_(k)
        self.tail_v[:, :, : v.shape[-2]].copy_(v)
        self.n_tail, self.prepared = k.shape[-2], 0
        self._after_change()
        decision = self.context.decision
        if decision.demote_blocks and not self.static.hooked_step:  # no step hooks, so prepare() did not demote
            self.demote(decision.bits, decision.demote_blocks)
            if self._pending is None:  # no side stream: done already, publish now (else at the next step)
                self._after_change()
        if self.index == self.static.n_layers - 1:
            self.static.publish_lengths()
        return out

    # ------------------------------------------------------------------ host step (eager, around the graph)
    def can_prepare(self, q: int) -> bool:
        """Whether :meth:`prepare` can make room for ``q`` rows (pure arithmetic on the host counters)."""
        s = self.context.settings
        if self.n_tail + q <= self.tail_capacity:
            return True
        n = (self.n_tail - s.residual_length) // s.block_size
        return n > 0 and self.n_tail - n * s.block_size + q <= self.tail_capacity

    def prepare(self, q: int) -> bool:
        """Make room for ``q`` new tail rows (flush whole blocks, demote per the decision); False if it cannot.

        Demotions run on the side stream and are published to the device block table only at the next step,
        after the stream waited for them: until then the step reads the blocks' old (intact) slots.
        """
        self._sync_pending()
        if self._table_dirty:  # last step's demotion (or a released pool) is now safe to publish
            self._after_change()
        s, decision = self.context.settings, self.context.decision
        if self.n_tail + q > self.tail_capacity:
            n = (self.n_tail - s.residual_length) // s.block_size
            if n <= 0 or self.n_tail - n * s.block_size + q > self.tail_capacity:
                return False
            rows = n * s.block_size
            self._store_blocks(self.tail_k[:, :, :rows], self.tail_v[:, :, :rows], decision.bits)
            keep = self.n_tail - rows
            self.tail_k[:, :, :keep].copy_(self.tail_k[:, :, rows: self.n_tail].clone())
            self.tail_v[:, :, :keep].copy_(self.tail_v[:, :, rows: self.n_tail].clone())
            self.n_tail = keep
            self._after_change()
        if decision.demote_blocks:
            self.demote(decision.bits, decision.demote_blocks)
            if self._pending is None:  # no side stream: done already, publish now
                self._after_change()
        self.prepared = q
        return True

    def commit(self) -> None:
        """The prepared rows were written by the step that just ran."""
        self.n_tail += self.prepared
        self.prepared = 0

    def _after_change(self) -> None:
        self.static.on_host_change()
        if self._table_dirty:  # the block table changed: refresh its device copy
            self._table_dirty = False
            n = len(self.block_bits)
            rows, starts = packed.book_table(self.block_bits, self.block_slot)
            if n:
                self.table[:, :n].copy_(to_device(torch.tensor(rows, dtype=torch.int64), self.device))
            self.group_starts.copy_(to_device(torch.tensor(starts, dtype=torch.int64), self.device))
        self._refresh_view()

    # ------------------------------------------------------------------ storage
    def _pool(self, bits: int) -> BlockPool:
        if bits not in self.pools:
            pool = BlockPool(bits, self.shape)
            pool.reserve(self._pool_capacity(pool))
            self.pools[bits] = pool
        return self.pools[bits]

    def _pool_capacity(self, pool: BlockPool) -> int:
        budget = self.context.settings.memory_budget
        lowest = pool.bits <= self.static.lowest_bits
        if budget is None or lowest:
            return self.capacity_blocks
        per_layer = budget / max(self.static.n_layers, 1)
        return max(MIN_POOL_SLOTS, min(self.capacity_blocks, math.ceil(per_layer / pool.slot_bytes())))

    def _maybe_compact(self) -> None:
        """Static storage never shrinks in place; a pool emptied by demotion is released as a whole (a cache
        holding no block, e.g. after ``reset``, keeps its pools for the next sequence)."""
        if not self.block_bits:
            return
        for bits in [b for b, p in self.pools.items() if p.used == 0 and b not in self.block_bits]:
            del self.pools[bits]
            self._gather = None
            self._table_dirty = True

    def _placeholder(self, bits: int) -> BlockPool:
        if bits not in self._placeholders:
            pool = BlockPool(bits, self.shape)
            pool.reserve(MIN_POOL_SLOTS)
            self._placeholders[bits] = pool
        return self._placeholders[bits]

    def _refresh_view(self) -> None:
        key = tuple((b, id(p.tensors[next(iter(p.tensors))])) for b, p in sorted(self.pools.items()))
        if key == self._view_key and self.view is not None:
            return
        if self._view_key is not None:
            self.static.on_view_change()
        # the same precisions in every view (real pool or placeholder): the step's signature never changes
        by_bits = {b: self.pools[b] if b in self.pools else self._placeholder(b)
                   for b in (16, *self.static.view_bits)}
        for pool in by_bits.values():
            for t in pool.tensors.values():
                _mark_pool(t)
        full_k, full_v = by_bits[16].tensors["k"], by_bits[16].tensors["v"]
        # the pools' own tensors (not slices of them: a slice is a new tensor without the marks above, which
        # cudagraphs would copy into its input buffers on every replay, and dynamo would specialize)
        pools = {b: packed.QuantPool(b, *(p.tensors[name] for name in _QUANT_FIELDS))
                 for b, p in by_bits.items() if b != 16}
        # the kernel reads the pools through the book: rewritten here (eagerly, between steps), it lets a pool be
        # created, grown or released without the compiled step seeing a new tensor
        header = torch.tensor(packed.book_entries(full_k, full_v, pools), dtype=torch.int64)
        self.book[: packed.BOOK_SIZE].copy_(header)
        bits, slots = self.table[0], self.table[1]
        for t in (bits, slots):  # views are new tensors: mark them, or CUDA graphs copy them in every replay
            _mark_static(t)
        self.view = packed.PackedKV(self.shape.block_size, self.shape.value_group, bits, slots,
                                    full_k, full_v, self.tail_k, self.tail_v, pools,
                                    lengths=self.static.lengths.lens, max_tokens=self.static.max_cache_len,
                                    book=packed.PoolBook(self.book, tuple(sorted(pools)), self.capacity_blocks))
        packed.attach_packed_view(self.tail_k, self.view)
        self._view_key = key

    def packed_view(self) -> packed.PackedKV:
        """The layer's static view (capacity-sized tensors, live extents in ``view.lengths``)."""
        if self.view is None:
            raise ValueError("packed_view() needs at least one update(); this layer holds no tokens yet.")
        return self.view

    # ------------------------------------------------------------------ transformers Cache API
    def get_seq_length(self):
        if torch.compiler.is_compiling():
            return self.static.lengths.seen
        if not self.is_initialized:
            return 0
        return len(self.block_bits) * self.shape.block_size + self.n_tail

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        """The key length ``update`` will hand the attention: the static length for a step that reads the static
        view (key positions are logical positions), else the exact keys stored so far plus the new ones."""
        if torch.compiler.is_compiling() or (query_length == 1 and self.static.packed_decode_enabled()):
            return self.static.max_cache_len, 0
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.static.max_cache_len

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative int; a positive value raises ``ValueError``, as
        transformers' ``DynamicLayer.crop`` does).

        Exact within the tail; deeper, whole blocks come back into the tail dequantized (lossy when quantized,
        counted in ``lossy_crop_tokens``)."""
        length = self.get_seq_length()
        keep = length - min(tokens_to_crop(tokens_to_remove), length)
        if keep == length:
            return
        bs = self.shape.block_size
        self._sync_pending()
        self._full = None
        while len(self.block_bits) * bs > keep:
            self._pop_block_static()
        self.n_tail = keep - len(self.block_bits) * bs
        self._after_change()
        self.static.publish_lengths()

    def _pop_block_static(self) -> None:
        bits, slot = self.block_bits.pop(), self.block_slot.pop()
        pool = self.pools[bits]
        k, v = pool.dequantize(pool.read([slot]), self.dtype)
        pool.release([slot])
        self._gather = None
        self._table_dirty = True
        room = self.tail_capacity - k.shape[-2]
        self.n_tail = min(self.n_tail, room)  # rows past the room are being cropped anyway
        self.tail_k[:, :, k.shape[-2]: k.shape[-2] + self.n_tail].copy_(self.tail_k[:, :, : self.n_tail].clone())
        self.tail_v[:, :, k.shape[-2]: k.shape[-2] + self.n_tail].copy_(self.tail_v[:, :, : self.n_tail].clone())
        self.tail_k[:, :, : k.shape[-2]].copy_(k)
        self.tail_v[:, :, : v.shape[-2]].copy_(v)
        self.n_tail += k.shape[-2]
        self._note_lossy_pop(bits)

    def _apply_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self._sync_pending()
        for name in ("tail_k", "tail_v"):
            new = fn(getattr(self, name))
            if new.shape == getattr(self, name).shape:
                getattr(self, name).copy_(new)
            else:
                _mark_static(new)
                setattr(self, name, new)
        for pool in self.pools.values():
            pool.apply_batch(fn)
        self.shape = replace(self.shape, batch=self.tail_k.shape[0])
        self._set_row_bytes()
        self._placeholders = {}  # sized for the old batch
        self._view_key = None
        self._after_change()
