"""``AdaptiveStaticKVCache``: the adaptive KV cache with static shapes, for transformers' compiled decode.

Contract: same storage and policy as :class:`~hf_adaptive.kv.cache.AdaptiveKVCache` (block table, per-precision
pools, exact tail, pressure ladder, demotion), with every tensor the decode step reads preallocated and its
live extents on the device, so ``model.generate`` can ``torch.compile`` the step and replay it as a CUDA graph:

- the exact tail is a (B, H, residual_length + block_size, D) buffer; a decode step writes one row at a
  device-held position; the attention reads the packed view through one custom op (fused Triton kernel on
  CUDA) whose lengths are read on the device (``PackedKV.lengths``);
- the host work of a step (pressure reading, policy decision, moving a full block out of the tail, demotions,
  the device lengths) runs eagerly in forward hooks *around* the compiled step, which
  :func:`hf_adaptive.enable_fused_attention` installs; the compiled region holds only tensor ops;
- pools are allocated at their capacity when a precision is first used (all ``max_cache_len`` tokens; for
  precisions above the lowest, capped by ``memory_budget``). The view the compiled step reads has a fixed
  signature: one pool per precision the policy can reach, a 2-slot placeholder until the real pool exists,
  and the pools' slot extents marked dynamic, so a precision switch (a pool appearing or being released)
  does not re-trace the step; only the CUDA graph is re-captured, since the pool addresses change.
  ``view_changes`` counts those steps.
Full-attention models only (no sliding-window layers); prefill runs eagerly and attends exactly.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from transformers import PretrainedConfig

from hf_adaptive.kv import packed
from hf_adaptive.kv.cache import AdaptiveKVCache
from hf_adaptive.kv.config import check_max_cache_len, context_limit
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


class StaticAdaptiveLayer(AdaptiveFullLayer):
    """Full-attention layer with a preallocated tail, capacity-sized pools and a device block table."""

    is_compileable = True

    def __init__(self, context: LayerContext, cache: AdaptiveStaticKVCache, index: int):
        self._cache = cache
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
        self._cache.note_host_change()

    def demote(self, target_bits: int, max_blocks: int) -> int:
        n = super().demote(target_bits, max_blocks)
        self._table_dirty = self._table_dirty or n > 0
        if n:
            self._cache.note_host_change()
        return n

    @property
    def capacity_blocks(self) -> int:
        return math.ceil(self._cache.max_cache_len / self.context.settings.block_size)

    @property
    def tail_capacity(self) -> int:
        s = self.context.settings
        return s.residual_length + s.block_size

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        B, H, _, D = key_states.shape
        self.tail_k = key_states.new_zeros(B, H, self.tail_capacity, D)
        self.tail_v = value_states.new_zeros(B, H, self.tail_capacity, value_states.shape[-1])
        self.table = torch.zeros(2, self.capacity_blocks, dtype=torch.int32, device=self.device)
        for t in (self.tail_k, self.tail_v, self.table):
            _mark_static(t)
        self._tail_backed = True
        self._set_row_bytes()
        self._cache.lengths_for(self.device)

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
                self._cache.lengths.advance(q)
            self.tail_k[:, :, self.n_tail: self.n_tail + q].copy_(key_states)
            self.tail_v[:, :, self.n_tail: self.n_tail + q].copy_(value_states)
            if q == 1 and self.context.packed_decode:
                return self._handles()
            return self._dense(self.n_tail + q)
        return self._update_unprepared(key_states, value_states)

    def _update_compiled(self, key_states: torch.Tensor, value_states: torch.Tensor):
        if not self.context.packed_decode:
            raise ValueError("AdaptiveStaticKVCache: a compiled decode step must read the cache through "
                             "attn_implementation='hf_adaptive'. Fix: hf_adaptive.enable_fused_attention(model).")
        if not self.is_initialized or key_states.shape[-2] != 1 or not self._cache.hooked_step:
            raise ValueError("AdaptiveStaticKVCache: a compiled forward must be a decode step (q_len 1) after an "
                             "eager prefill, with the step hooks installed. Fix: call "
                             "hf_adaptive.enable_fused_attention(model) before generate.")
        if self.index == 0:  # the first layer of the step advances the shared lengths for every layer
            self._cache.lengths.advance(1)
        pos = (self._cache.lengths.lens[1:2] - 1).long()  # this step's row
        self.tail_k.index_copy_(2, pos, key_states)
        self.tail_v.index_copy_(2, pos, value_states)
        return self.tail_k, self.tail_v

    def _decode_unhooked(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Eager decode without the step hooks (the cache's own per-step bookkeeping ran): the hooks' work for this
        layer, then the same write and static view, so every decode step reads the view its mask was sized for."""
        self.prepare(1)
        self.tail_k[:, :, self.n_tail: self.n_tail + 1].copy_(key_states)
        self.tail_v[:, :, self.n_tail: self.n_tail + 1].copy_(value_states)
        n_blocks = len(self.block_bits)
        self._cache.lengths.set(n_blocks, self.n_tail + 1, n_blocks * self.shape.block_size + self.n_tail + 1)
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
        check_room(self._cache.max_cache_len, self.get_seq_length(), key_states.shape[-2])
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
        if decision.demote_blocks and not self._cache.hooked_step:  # no step hooks, so prepare() did not demote
            self.demote(decision.bits, decision.demote_blocks)
            if self._pending is None:  # no side stream: done already, publish now (else at the next step)
                self._after_change()
        if self.index == len(self._cache.layers) - 1:
            self._cache.write_lengths()
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
        self._cache.note_host_change()
        if self._table_dirty:  # the block table changed: refresh its device copy
            self._table_dirty = False
            n = len(self.block_bits)
            if n:
                host = torch.tensor([self.block_bits, self.block_slot], dtype=torch.int32)
                self.table[:, :n].copy_(to_device(host, self.device))
        self._refresh_view()

    # ------------------------------------------------------------------ storage
    def _pool(self, bits: int) -> BlockPool:
        if bits not in self.pools:
            pool = BlockPool(bits, self.shape)
            pool._grow(self._pool_capacity(pool))
            self.pools[bits] = pool
        return self.pools[bits]

    def _pool_capacity(self, pool: BlockPool) -> int:
        budget = self.context.settings.memory_budget
        lowest = pool.bits <= self._cache.lowest_bits
        if budget is None or lowest:
            return self.capacity_blocks
        per_layer = budget / max(len(self._cache.layers), 1)
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
            pool._grow(MIN_POOL_SLOTS)
            self._placeholders[bits] = pool
        return self._placeholders[bits]

    def _refresh_view(self) -> None:
        key = tuple((b, id(p.tensors[next(iter(p.tensors))])) for b, p in sorted(self.pools.items()))
        if key == self._view_key and self.view is not None:
            return
        if self._view_key is not None:
            self._cache.note_view_change()
        # the same precisions in every view (real pool or placeholder): the step's signature never changes
        by_bits = {b: self.pools[b] if b in self.pools else self._placeholder(b)
                   for b in (16, *self._cache.view_bits)}
        for pool in by_bits.values():
            for t in pool.tensors.values():
                _mark_pool(t)
        full_k, full_v = by_bits[16].tensors["k"], by_bits[16].tensors["v"]
        # the pools' own tensors (not slices of them: a slice is a new tensor without the marks above, which
        # cudagraphs would copy into its input buffers on every replay, and dynamo would specialize)
        pools = {b: packed.QuantPool(b, *(p.tensors[name] for name in _QUANT_FIELDS))
                 for b, p in by_bits.items() if b != 16}
        self.view = packed.PackedKV(self.shape.block_size, self.shape.value_group, self.table[0], self.table[1],
                                    full_k, full_v, self.tail_k, self.tail_v, pools,
                                    lengths=self._cache.lengths.lens, max_tokens=self._cache.max_cache_len)
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
            return self._cache.lengths.seen
        if not self.is_initialized:
            return 0
        return len(self.block_bits) * self.shape.block_size + self.n_tail

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        """The key length ``update`` will hand the attention: the static length for a step that reads the static
        view (key positions are logical positions), else the exact keys stored so far plus the new ones."""
        if torch.compiler.is_compiling() or (query_length == 1 and self._cache.packed_decode_enabled()):
            return self._cache.max_cache_len, 0
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self._cache.max_cache_len

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
        self._cache.write_lengths()

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
        self.shape = type(self.shape)(self.tail_k.shape[0], *list(vars(self.shape).values())[1:])
        self._set_row_bytes()
        self._placeholders = {}  # sized for the old batch
        self._view_key = None
        self._after_change()


class AdaptiveStaticKVCache(AdaptiveKVCache):
    """:class:`AdaptiveKVCache` with static shapes for compiled / CUDA-graph decoding.

    Args:
        config: the model's config (full-attention layers only).
        max_cache_len: most tokens per sequence (prompt + new tokens); fixes every shape.
        kv_config, pressure, **overrides: as :class:`AdaptiveKVCache` (``memory_budget``, ``fixed_bits``, ...).

    Example::

        hf_adaptive.enable_fused_attention(model)  # attention + the step hooks (once per model)
        cache = AdaptiveStaticKVCache(model.config, max_cache_len=4096 + 256, fixed_bits=4)
        out = model.generate(**inputs, max_new_tokens=256, **generate_cache_kwargs(cache))  # compiled on CUDA
    """

    def __init__(self, config: PretrainedConfig, max_cache_len: int, kv_config=None, *, pressure=None,
                 **overrides):
        text = config.get_text_config(decoder=True) if isinstance(config, PretrainedConfig) else None
        check_max_cache_len(max_cache_len, context_limit(text))
        self._max_cache_len = max_cache_len
        self.view_changes = 0  # steps whose pools changed (the CUDA graph is re-captured; no re-trace)
        self._view_changed_step = -1
        self.hooked_step = False  # True between the step hooks of a forward (the host work is done there)
        self.lengths: StaticLengths | None = None
        self._steady = False  # no host work pending: a decode step with room in the tails takes the fast path
        self._stored_bytes: int | None = None  # bytes of stored blocks, all layers (None: recount)
        self._host_ns = 0  # host time spent in the step hooks
        self._host_steps = 0
        super().__init__(config, kv_config, pressure=pressure, packed_attention="auto", **overrides)
        stages = (self.settings.fixed_bits,) if self.settings.fixed_bits is not None \
            else tuple(s.bits for s in self.settings.policy.stages)
        self.view_bits = tuple(sorted({b for b in stages if b < 16}, reverse=True))  # quantized pools a view holds

    def _build_layers(self) -> list:
        from transformers.cache_utils import get_layer_types_and_kwargs

        layer_types, _ = get_layer_types_and_kwargs(self.text_config)
        bad = sorted({t for t in layer_types if t != "full_attention"})
        if bad:
            raise ValueError(f"AdaptiveStaticKVCache holds full-attention layers only; this model has {bad}. "
                             "Fix: use AdaptiveKVCache (eager decode) for sliding-window / hybrid models.")
        return [StaticAdaptiveLayer(self.context, self, i) for i in range(len(layer_types))]

    @property
    def max_cache_len(self) -> int:
        """Most tokens per sequence (transformers 5.17's ``Cache`` has a read-only property of this name)."""
        return self._max_cache_len

    def note_view_change(self) -> None:
        """Count a step in which some layer's pools changed (once per step, however many layers)."""
        if self._view_changed_step != len(self.history):
            self._view_changed_step = len(self.history)
            self.view_changes += 1

    def note_host_change(self) -> None:
        """A layer changed its host state (block table, pools, tail rows, pending demotion): the next step takes
        the full host path and the stored-bytes count is recomputed."""
        self._steady = False
        self._stored_bytes = None

    def _decide(self, q: int, incoming_bytes: int) -> None:
        """Refuse a forward past ``max_cache_len`` before any layer stores a token (every path runs this once per
        forward, eagerly: the step hooks, the eager decode and prefill), then decide as the dynamic cache does."""
        try:
            check_room(self.max_cache_len, self.get_seq_length(), q)
        except CacheFullError:
            self.hooked_step = False  # no layer was prepared: the next forward starts from the same state
            raise
        super()._decide(q, incoming_bytes)

    def lengths_for(self, device: torch.device) -> StaticLengths:
        if self.lengths is None:
            self.lengths = StaticLengths(device)
        return self.lengths

    def write_lengths(self) -> None:
        """Publish the committed host counts (layer 0's; every layer holds the same) to the device lengths."""
        layer0 = self.layers[0]
        if self.lengths is None or not layer0.is_initialized:
            return
        n_blocks = len(layer0.block_bits)
        self.lengths.set(n_blocks, layer0.n_tail, n_blocks * layer0.shape.block_size + layer0.n_tail)

    def live_bytes(self) -> int:
        """KV bytes live in all layers: the stored blocks (recounted only after a change) plus the tails."""
        if self._stored_bytes is None:
            self._stored_bytes = sum(sum(p.live_bytes() for p in layer.pools.values()) for layer in self.layers
                                     if layer.is_initialized)
        layer0 = self.layers[0]
        tails = layer0.n_tail * layer0._row_bytes * len(self.layers) if layer0.is_initialized else 0
        return self._stored_bytes + tails

    # ------------------------------------------------------------------ step hooks (eager)
    def begin_step(self, q: int) -> None:
        """Before a forward of ``q`` tokens: pressure + decision, room in every tail, device lengths.

        The common decode step (room left in the tails, no demotion decided or pending, no block-table change to
        publish) only records the decision: the compiled step advances the device lengths itself.
        """
        layer0 = self.layers[0]
        if not layer0.is_initialized or not layer0.can_prepare(q):
            return  # a prefill (or chunk) longer than the tail: update() stores it eagerly, without the hooks
        t0 = time.perf_counter_ns()
        self.hooked_step = True
        self._begin_step_for(q, layer0)
        if self._steady and layer0.n_tail + q <= layer0.tail_capacity and not self.context.decision.demote_blocks:
            for layer in self.layers:
                layer.prepared = q
        else:
            self._begin_step_full(q)
        self._host_ns += time.perf_counter_ns() - t0

    def _begin_step_full(self, q: int) -> None:
        ready = all(layer.prepare(q) for layer in self.layers)
        if not ready:  # too many tokens for the tail (chunked prefill): update() stores them eagerly
            for layer in self.layers:
                layer.prepared = 0
            self.hooked_step = False
            return
        self.write_lengths()
        self._steady = all(layer._pending is None and not layer._table_dirty for layer in self.layers)

    def _begin_step_for(self, q: int, layer0: StaticAdaptiveLayer) -> None:
        B, H, _, D = layer0.tail_k.shape
        self._decide(q, q * B * H * D * 2 * layer0.tail_k.element_size() * len(self.layers))

    def end_step(self) -> None:
        """After the forward: the prepared rows are written; record the step."""
        if not self.hooked_step:
            return
        t0 = time.perf_counter_ns()
        self.hooked_step = False
        for layer in self.layers:
            layer.commit()
        self._end_step()
        self._host_ns += time.perf_counter_ns() - t0
        self._host_steps += 1

    def reset(self) -> None:
        """Drop all tokens, the policy state and the history, keeping every buffer where it is (same addresses,
        so the compiled step and its CUDA graph are reused by the next ``generate``; a different batch size or
        dtype reallocates on the next prefill)."""
        for layer in self.layers:
            layer.drop_tokens()
        self.policy.reset()
        self._clear_telemetry()
        self._host_ns = self._host_steps = 0
        self.hooked_step = False
        self.view_changes, self._view_changed_step = 0, -1
        self.note_host_change()
        self.write_lengths()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if torch.compiler.is_compiling() or self.hooked_step:
            return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)  # no hooks: eager bookkeeping
        return out

    def stats(self) -> dict:
        out = super().stats()
        out.update(max_cache_len=self.max_cache_len, view_changes=self.view_changes,
                   host_us_per_step=self._host_ns / 1000 / self._host_steps if self._host_steps else None)
        return out
