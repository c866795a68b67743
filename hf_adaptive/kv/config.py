"""Settings of the adaptive KV cache: one frozen dataclass, validated on construction. No torch import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hf_adaptive.policy.kv_policy import ALLOWED_BITS, KVPolicyConfig
from hf_adaptive.units import parse_bytes
from hf_adaptive.validation import FieldValueError, check_choice, check_number, check_type

BACKENDS = ("torch", "hqq")
ON_BUDGET_EXCEEDED = ("warn", "raise")


@dataclass(frozen=True)
class KVCacheConfig:
    """How :class:`hf_adaptive.AdaptiveKVCache` stores keys and values.

    Attributes:
        residual_length: tokens always kept exact (model dtype) at the end of the sequence. Once history
            exists the exact tail holds between ``residual_length`` and ``residual_length + block_size`` tokens.
        block_size: tokens per history block (the unit of quantization, demotion and the kernel's block table).
        value_group: channels per value quantization group (clamped to the head dim when larger).
        backend: quantizer computing codes/scales/zeros: ``"torch"`` (min-max, packed.py) or ``"hqq"``
            (half-quadratic optimized zero/scale; needs the ``hqq`` package).
        memory_budget: KV byte budget (int bytes or a string like ``"2GiB"``) for :class:`BudgetPressure`;
            ``None`` means no budget. Mutually exclusive with ``gpu_memory_fraction``.
        gpu_memory_fraction: target fraction of the GPU's memory for :class:`GPUMemoryPressure`, e.g. 0.9.
        fixed_bits: if set, every token leaving the exact window is stored at this precision from the start
            and pressure is ignored (deterministic rung for evaluations), e.g. ``fixed_bits=4``.
        policy: the hysteresis ladder (thresholds, cooldown, demotion speed).
        on_budget_exceeded: what to do when the budget is exceeded at the lowest rung with nothing left to
            demote: ``"warn"`` (log + ``RuntimeWarning`` once, keep going, over budget) or ``"raise"``
            (:class:`hf_adaptive.kv.pressure.KVBudgetExceededError`).
        side_stream: on CUDA, run demotion quantization on a side stream.
    """

    residual_length: int = 64
    block_size: int = 64
    value_group: int = 64
    backend: str = "torch"
    memory_budget: int | str | None = None
    gpu_memory_fraction: float | None = None
    fixed_bits: int | None = None
    policy: KVPolicyConfig = field(default_factory=KVPolicyConfig)
    on_budget_exceeded: str = "warn"
    side_stream: bool = True

    def __post_init__(self) -> None:
        for name in ("residual_length", "block_size", "value_group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}. Fix: e.g. {name}=64.")
        if self.block_size % 8:
            raise ValueError(f"block_size must be a multiple of 8 (packed code rows); got {self.block_size}. "
                             "Fix: e.g. block_size=64.")
        check_choice(self.backend, "backend", BACKENDS, "backend='torch'")
        if self.fixed_bits is not None:  # 4.0 == 4 passes a membership test and fails later in the packer
            check_choice(self.fixed_bits, "fixed_bits", ALLOWED_BITS, "fixed_bits=4 (or None: follow pressure)")
        check_choice(self.on_budget_exceeded, "on_budget_exceeded", ON_BUDGET_EXCEEDED, "on_budget_exceeded='warn'")
        check_type(self.policy, "policy", KVPolicyConfig, "policy=KVPolicyConfig(cooldown_steps=8)")
        check_type(self.side_stream, "side_stream", bool, "side_stream=True")
        if self.memory_budget is not None:
            object.__setattr__(self, "memory_budget", parse_bytes(self.memory_budget, "memory_budget"))
        self._check_gpu_fraction()

    def _check_gpu_fraction(self) -> None:
        fraction = self.gpu_memory_fraction
        if fraction is None:
            return
        if self.memory_budget is not None:
            raise ValueError("memory_budget and gpu_memory_fraction are mutually exclusive; got both "
                             f"({self.memory_budget!r}, {fraction!r}). Fix: pass only one.")
        check_number(fraction, "gpu_memory_fraction", minimum=0.0, maximum=1.0, min_open=True,
                     fix="gpu_memory_fraction=0.9")


def context_limit(text_config: Any) -> int | None:
    """Most positions the model attends: ``max_position_embeddings`` times a RoPE scaling ``factor`` where the
    config has one (YaRN / linear scaling extend the trained length); None when the config gives no length."""
    length = getattr(text_config, "max_position_embeddings", None)
    if not isinstance(length, int) or isinstance(length, bool):
        return None
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    factor = rope.get("factor") if isinstance(rope, dict) else None
    return int(length * factor) if isinstance(factor, (int, float)) and factor > 1 else length


def check_max_cache_len(max_cache_len: int, limit: int | None) -> int:
    """``max_cache_len`` of a static cache: an int >= 2 and no longer than the model attends (``limit``, from
    ``context_limit``); every shape and pool is sized from it up front."""
    check_number(max_cache_len, "max_cache_len", minimum=2, integer=True,
                 fix="max_cache_len=input_len + max_new_tokens")
    if limit is not None and max_cache_len > limit:
        raise FieldValueError(f"max_cache_len={max_cache_len} is longer than the model attends ({limit} positions: "
                              "max_position_embeddings, times any RoPE scaling factor); positions past it are "
                              f"undefined and the pools would be sized for all of it. Fix: max_cache_len <= {limit}, "
                              "e.g. input_len + max_new_tokens.", "max_cache_len")
    return max_cache_len
