"""``AdaptiveStaticKVCache``: the adaptive KV cache with static shapes, for transformers' compiled decode.

Contract: same storage and policy as :class:`~hf_adaptive.kv.cache.AdaptiveKVCache` (block table, per-precision
pools, exact tail, pressure ladder, demotion), with every tensor the decode step reads preallocated and its
live extents on the device, so ``model.generate`` can ``torch.compile`` the step and replay it as a CUDA graph:

- the exact tail is a (B, H, residual_length + block_size, D) buffer; a decode step writes one row at a
  device-held position; the attention reads the packed view through one custom op (fused Triton kernel on
  CUDA) whose lengths are read on the device (``PackedKV.lengths``);
- the host work of a step (pressure reading, policy decision, moving a full block out of the tail, demotions)
  runs eagerly in forward hooks *around* the compiled step (:mod:`hf_adaptive.kv.hooks`, installed by
  :func:`hf_adaptive.enable_fused_attention`); the compiled region holds only tensor ops and advances the device
  lengths itself, so a step that moves no block writes nothing from the host;
- ``reset()`` keeps every buffer at its address: a cache reused across ``generate`` calls under one
  ``max_cache_len`` reuses the compiled step and its CUDA graph;
- pools are allocated at their capacity when a precision is first used (all ``max_cache_len`` tokens; for
  precisions above the lowest, capped by ``memory_budget``). The view the compiled step reads has a fixed
  signature: one pool per precision the policy can reach, a 2-slot placeholder until the real pool exists.
  On CUDA the kernel finds the pools through the layer's address book (:class:`~hf_adaptive.kv.packed.PoolBook`,
  one fixed int64 tensor rewritten between steps), so a precision switch (a pool appearing, growing or being
  released) changes no input of the compiled step: no re-trace, no CUDA-graph re-capture. Elsewhere (the
  torch reference) the pools are inputs with dynamic extents: no re-trace. ``view_changes`` counts those steps.
Full-attention models only (no sliding-window layers); prefill runs eagerly and attends exactly. The layers are
:class:`~hf_adaptive.kv.static_layer.StaticAdaptiveLayer`.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import PretrainedConfig

from hf_adaptive import overlap
from hf_adaptive.kv.cache import AdaptiveKVCache
from hf_adaptive.kv.config import check_max_cache_len, context_limit
from hf_adaptive.kv.static_layer import (  # noqa: F401  (CacheFullError, StaticLengths: part of this module's API)
    CacheFullError, StaticAdaptiveLayer, StaticContext, StaticLengths, check_room)

logger = logging.getLogger(__name__)


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

    compiled_step_tokens = 1  # the compiled step is a one-token decode step; longer forwards run eagerly
    # generate on CUDA reads its stop flag one step late (hf_adaptive.overlap): the host queues the next step while
    # the device runs this one; the extra step after the last token is cropped off the tail, exactly
    defers_stop_check = True

    def __init__(self, config: PretrainedConfig, max_cache_len: int, kv_config=None, *, pressure=None,
                 **overrides):
        text = config.get_text_config(decoder=True) if isinstance(config, PretrainedConfig) else None
        check_max_cache_len(max_cache_len, context_limit(text))
        self._max_cache_len = max_cache_len
        self.view_changes = 0  # steps whose pools changed (on CUDA read through the address book: no re-capture)
        self._view_changed_step = -1
        self.static = StaticContext(max_cache_len, 0, self.packed_decode_enabled, self.note_host_change,
                                    self.note_view_change, self.write_lengths)
        self._steady = False  # no host work pending: a decode step with room in the tails takes the fast path
        self._stored_bytes: int | None = None  # bytes of stored blocks, all layers (None: recount)
        self._host_ns = 0  # host time spent in the step hooks
        self._host_steps = 0
        super().__init__(config, kv_config, pressure=pressure, packed_attention="auto", **overrides)
        overlap.install()
        stages = (self.settings.fixed_bits,) if self.settings.fixed_bits is not None \
            else tuple(s.bits for s in self.settings.policy.stages)
        self.view_bits = tuple(sorted({b for b in stages if b < 16}, reverse=True))  # quantized pools a view holds
        self.static.lowest_bits, self.static.view_bits = self.lowest_bits, self.view_bits

    def _build_layers(self) -> list:
        from transformers.cache_utils import get_layer_types_and_kwargs

        layer_types, _ = get_layer_types_and_kwargs(self.text_config)
        bad = sorted({t for t in layer_types if t != "full_attention"})
        if bad:
            raise ValueError(f"AdaptiveStaticKVCache holds full-attention layers only; this model has {bad}. "
                             "Fix: use AdaptiveKVCache (eager decode) for sliding-window / hybrid models.")
        self.static.n_layers = len(layer_types)
        return [StaticAdaptiveLayer(self.context, self.static, i) for i in range(len(layer_types))]

    @property
    def hooked_step(self) -> bool:
        """True between the step hooks of a forward (its host work is done; the layers only write their row)."""
        return self.static.hooked_step

    @hooked_step.setter
    def hooked_step(self, value: bool) -> None:
        self.static.hooked_step = value

    @property
    def lengths(self) -> StaticLengths | None:
        """The device lengths every layer shares (None before the first forward)."""
        return self.static.lengths

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
