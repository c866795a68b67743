"""``AdaptiveKVCache``: a transformers ``Cache`` whose KV precision follows memory pressure.

Contract: drop-in for ``DynamicCache`` in ``model.generate(..., past_key_values=cache)`` (transformers
5.17+; on 5.23+ also ``cache=cache``). Once per forward step (when layer 0 is updated) it reads ONE
pressure source and asks ONE policy for a decision, which every layer then applies; every step is recorded
in ``history``. Storage per full-attention layer is the packed layout of :mod:`hf_adaptive.kv.packed`
(see :class:`hf_adaptive.kv.layer.AdaptiveFullLayer`); sliding-window layers (Gemma 3 style hybrids) keep
transformers' bounded exact sliding window and are never quantized.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import replace

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from hf_adaptive.kv.config import KVCacheConfig
from hf_adaptive.kv.layer import AdaptiveFullLayer, LayerContext
from hf_adaptive.kv.pressure import (BudgetPressure, GPUMemoryPressure, KVBudgetExceededError, NoPressure,
                                     PressureReading, PressureSource)
from hf_adaptive.kv.quantizers import make_quantizer
from hf_adaptive.kv.sliding import AdaptiveSlidingLayer
from hf_adaptive.policy.kv_policy import FixedBitsPolicy, HysteresisPolicy
from hf_adaptive.units import format_bytes
from hf_adaptive.validation import check_decoder_only

logger = logging.getLogger(__name__)
SLIDING_TYPES = ("sliding_attention", "chunked_attention")
PACKED_ATTENTION_MODES = (True, False, "auto")
FUSED_ATTENTION_NAME = "hf_adaptive"  # == hf_adaptive.attention.interface.ATTENTION_NAME
_OVERRIDES = ("memory_budget", "backend", "fixed_bits", "residual_length", "block_size", "value_group",
              "gpu_memory_fraction", "on_budget_exceeded", "policy", "side_stream")


class AdaptiveKVCache(Cache):
    """KV cache stored at 16 bits under low pressure, stepping down to 8/4(/2) bits as pressure rises.

    Per full-attention layer: a 16-bit exact tail of the most recent ``residual_length`` to
    ``residual_length + block_size`` tokens, and history blocks of ``block_size`` tokens, each at the
    precision the policy chose when it left the tail; under high pressure the oldest 16/8-bit blocks are
    demoted (each block quantized once per demotion). Lossy data is never promoted back. Sliding-window
    layers keep a bounded exact window (not quantized).

    Args:
        config: the model's ``PretrainedConfig`` (its text config gives the layer types).
        kv_config: a :class:`KVCacheConfig`; the keyword arguments below override its fields.
        memory_budget: KV byte budget, int or e.g. ``"2GiB"`` (uses :class:`BudgetPressure`).
        backend: ``"torch"`` or ``"hqq"``.
        fixed_bits: store every token leaving the exact window at this precision, ignoring pressure.
        pressure: any :class:`PressureSource` (overrides the one derived from the settings).
        packed_attention: decode steps (q_len == 1) of full-attention layers hand the attention function the
            packed layout instead of a dequantized copy (O(1) work in the cache per step; the fused Triton
            kernel on CUDA, the torch reference elsewhere). ``True`` needs ``attn_implementation="hf_adaptive"``;
            ``False`` always dequantizes; ``"auto"`` (default) is on exactly when the model config's
            ``_attn_implementation`` is ``"hf_adaptive"`` (read every step). Prefill always dequantizes.
            One call turns it on: ``hf_adaptive.enable_fused_attention(model)``.
        **overrides: any other :class:`KVCacheConfig` field (residual_length, block_size, ...).

    Example::

        cache = AdaptiveKVCache(model.config, memory_budget="1GiB")
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=256)
        cache.stats()["ratio"]  # bytes stored / bf16 bytes

        hf_adaptive.enable_fused_attention(model)  # decode reads the packed cache directly (fused kernel)
    """

    def __init__(self, config: PretrainedConfig, kv_config: KVCacheConfig | None = None, *,
                 pressure: PressureSource | None = None, packed_attention: bool | str = "auto", **overrides):
        if not isinstance(config, PretrainedConfig):
            raise ValueError(f"config must be a transformers PretrainedConfig (e.g. model.config); got "
                            f"{type(config).__name__}. Fix: AdaptiveKVCache(model.config, ...).")
        if kv_config is not None and not isinstance(kv_config, KVCacheConfig):
            raise ValueError(f"kv_config must be a KVCacheConfig or None; got {type(kv_config).__name__}. "
                            "Fix: KVCacheConfig(memory_budget='2GiB') or keyword arguments.")
        if not (isinstance(packed_attention, bool) or packed_attention == "auto"):
            raise ValueError(f"packed_attention must be one of {PACKED_ATTENTION_MODES}; got {packed_attention!r}. "
                             "Fix: packed_attention='auto' (on when attn_implementation='hf_adaptive').")
        check_decoder_only(config, "AdaptiveKVCache")
        self.packed_attention = packed_attention
        self.model_config = config
        unknown = sorted(set(overrides) - set(_OVERRIDES))
        if unknown:
            raise ValueError(f"unknown argument(s) {unknown}; allowed: {list(_OVERRIDES)} and pressure.")
        self.settings = replace(kv_config or KVCacheConfig(), **overrides)
        self.text_config = config.get_text_config(decoder=True)
        self.context = LayerContext(self.settings, make_quantizer(self.settings.backend))
        super().__init__(layers=self._build_layers())
        self.pressure = pressure if pressure is not None else self._default_pressure()
        if not isinstance(self.pressure, PressureSource):
            raise ValueError(f"pressure must have read(projected_kv_bytes) -> PressureReading; got "
                            f"{type(self.pressure).__name__}. Fix: BudgetPressure, GPUMemoryPressure or ScriptedPressure.")
        bits = self.settings.fixed_bits
        self.policy = FixedBitsPolicy(bits) if bits is not None else HysteresisPolicy(self.settings.policy)
        self.lowest_bits = bits if bits is not None else min(s.bits for s in self.settings.policy.stages)
        self._check_budget(batch=1, element_bytes=config_element_bytes(config))
        self._clear_telemetry()

    def _build_layers(self) -> list:
        layer_types, kwargs = get_layer_types_and_kwargs(self.text_config)
        if isinstance(kwargs, dict):  # transformers < 5.2x: one dict for all layers
            kwargs = [kwargs] * len(layer_types)
        layers = []
        for i, (kind, kw) in enumerate(zip(layer_types, kwargs)):
            if kind == "full_attention":
                layers.append(AdaptiveFullLayer(self.context))
            elif kind in SLIDING_TYPES:
                layers.append(AdaptiveSlidingLayer(sliding_window=kw["sliding_window"]))
            else:
                raise ValueError(f"layer {i} has layer type {kind!r}; AdaptiveKVCache supports "
                                 f"'full_attention' and {SLIDING_TYPES}. Fix: use DynamicCache for this model.")
        return layers

    def _default_pressure(self) -> PressureSource:
        if self.settings.memory_budget is not None:
            return BudgetPressure(self.settings.memory_budget)
        if self.settings.gpu_memory_fraction is not None:
            return GPUMemoryPressure(self.settings.gpu_memory_fraction)
        return NoPressure()

    def _clear_telemetry(self) -> None:
        self.history: list[dict] = []
        self.step = 0
        self.last_reading: PressureReading | None = None
        self.over_budget_steps = 0
        self._warned_over_budget = False

    # ------------------------------------------------------------------ budget checks
    def min_budget_bytes(self, batch: int, element_bytes: int) -> int:
        """Bytes of the exact windows alone (tails at most residual_length + block_size, sliding windows)."""
        cfg, s = self.text_config, self.settings
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_token = batch * heads * head_dim * 2 * element_bytes
        total = 0
        for layer in self.layers:
            window = s.residual_length + s.block_size
            if isinstance(layer, AdaptiveSlidingLayer):
                window = min(window, layer.sliding_window)
            total += window * per_token
        return total

    def _check_budget(self, batch: int, element_bytes: int) -> None:
        """Refuse a budget below the exact windows, with a fix that holds for ``element_bytes`` (the model dtype's
        size: from the config at construction, from the key states at the first update)."""
        budget = self.settings.memory_budget
        if budget is None:
            return
        needed = self.min_budget_bytes(batch, element_bytes)
        if budget < needed:
            raise ValueError(
                f"memory_budget={budget} bytes ({format_bytes(budget)}) cannot hold even the exact windows at the "
                f"lowest rung: they need {needed} bytes ({format_bytes(needed)}) for batch {batch} at "
                f"{element_bytes} bytes/element. Fix: memory_budget >= {needed} "
                f"(e.g. '{math.ceil(needed / 2**10)}KiB'), or lower residual_length/block_size.")

    # ------------------------------------------------------------------ per-step path
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store (B, H, q, D) states of ``layer_idx``; returns that layer's keys/values (B, H, past + q, D)."""
        if layer_idx == 0:
            self._begin_step(key_states)
        out = self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            self._end_step()
        return out

    def _begin_step(self, key_states: torch.Tensor) -> None:
        if self.step == 0 and not self.layers[0].is_initialized:
            self._check_budget(key_states.shape[0], key_states.element_size())
        B, H, q, D = key_states.shape
        self._decide(q, q * B * H * D * 2 * key_states.element_size() * len(self.layers))

    def _decide(self, q: int, incoming_bytes: int) -> None:
        """Read pressure once (live + incoming bytes), take the policy's decision for every layer, record it."""
        reading = self.pressure.read(self.live_bytes() + incoming_bytes)
        decision = self.policy.decide(reading.fraction, self.step)
        self.context.decision, self.last_reading = decision, reading
        self.context.packed_decode = self.packed_decode_enabled()
        self.history.append({"step": self.step, "tokens_in": q, "pressure": reading.to_dict(),
                             "stage": decision.stage, "bits": decision.bits,
                             "demote_blocks": decision.demote_blocks, "switched": decision.switched})

    def _end_step(self) -> None:
        live = self.live_bytes()
        self.history[-1]["kv_bytes"] = live
        self.step += 1
        budget = self.settings.memory_budget
        if budget is None or live <= budget:
            return
        if any(layer.demotable_above(self.lowest_bits) for layer in self.layers):
            return  # demotion is still under way
        self.over_budget_steps += 1
        self.history[-1]["over_budget"] = True
        message = (f"KV cache holds {live} bytes, over memory_budget={budget}, at the lowest rung "
                   f"({self.lowest_bits} bits) with nothing left to demote. Fix: raise memory_budget, lower "
                   "residual_length, allow 2 bits in the policy, or shorten the sequence.")
        if self.settings.on_budget_exceeded == "raise":
            raise KVBudgetExceededError(message)
        if not self._warned_over_budget:
            self._warned_over_budget = True
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def packed_decode_enabled(self) -> bool:
        """Whether decode steps return packed-view handles now (see ``packed_attention``)."""
        if self.packed_attention != "auto":
            return bool(self.packed_attention)
        impls = {getattr(c, "_attn_implementation", None) for c in (self.text_config, self.model_config)}
        return FUSED_ATTENTION_NAME in impls

    # ------------------------------------------------------------------ API and telemetry
    def reset(self) -> None:
        """Drop all tokens, the policy state and the history (the cache is as new)."""
        super().reset()
        self.policy.reset()
        self._clear_telemetry()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens of every layer (transformers' contract). ``crop(0)``, which
        generate's deferred stop check calls after every step (``hf_adaptive.overlap``), touches no layer unless one
        records past states (a sliding window then drops what it kept for a rollback)."""
        if tokens_to_remove == 0 and not any(getattr(layer, "record_past", False) for layer in self.layers):
            return
        super().crop(tokens_to_remove)

    def packed_view(self, layer_idx: int):
        """The packed layout (:class:`hf_adaptive.kv.packed.PackedKV`) of a full-attention layer."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, AdaptiveFullLayer):
            raise ValueError(f"layer_idx={layer_idx} is a {type(layer).__name__}; packed_view exists for "
                             "full-attention layers only. Fix: pick a full-attention layer index.")
        return layer.packed_view()

    def live_bytes(self) -> int:
        """KV bytes live in all layers (tails, used pool slots with scales and zeros, sliding windows)."""
        return sum(layer.live_bytes() for layer in self.layers)

    def stats(self) -> dict:
        """JSON-serializable summary: bits per layer, bytes vs bf16, ratio, switches, last pressure."""
        layers = [layer.stats() for layer in self.layers]
        live = sum(s["live_bytes"] for s in layers)
        bf16 = sum(s["bf16_bytes"] for s in layers)
        demotions: dict[str, int] = {}
        for s in layers:
            for key, n in s.get("demotions", {}).items():
                demotions[key] = demotions.get(key, 0) + n
        return {"step": self.step, "stage": self.policy.stage, "bits": self.context.decision.bits,
                "backend": self.settings.backend, "fixed_bits": self.settings.fixed_bits,
                "kv_bytes": live, "reserved_bytes": sum(s["reserved_bytes"] for s in layers),
                "bf16_equivalent_bytes": bf16, "ratio": live / bf16 if bf16 else 0.0,
                "switches": sum(1 for h in self.history if h["switched"]), "demotions": demotions,
                "over_budget_steps": self.over_budget_steps,
                "lossy_crop_tokens": sum(s.get("lossy_crop_tokens", 0) for s in layers),
                "last_pressure": self.last_reading.to_dict() if self.last_reading else None,
                "memory_budget": self.settings.memory_budget, "layers": layers}


def config_element_bytes(config: PretrainedConfig) -> int:
    """Bytes per KV element of the model's dtype as its config records it (``from_pretrained(dtype=...)`` sets
    it); 2 when the config names none (the first ``update`` checks again with the real key states)."""
    for c in (config.get_text_config(decoder=True), config):
        dtype = getattr(c, "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if isinstance(dtype, torch.dtype):
            return dtype.itemsize
    return 2


# Re-exported here: a public name since the first release (the rename is handled in hf_adaptive.compat).
from hf_adaptive.compat import generate_cache_kwargs  # noqa: E402,F401
