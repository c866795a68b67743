"""Settings of the adaptive KV cache: one frozen dataclass, validated on construction. No torch import."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_adaptive.policy.kv_policy import ALLOWED_BITS, KVPolicyConfig
from hf_adaptive.units import parse_bytes

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
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {self.backend!r}. Fix: backend='torch'.")
        if self.fixed_bits is not None and self.fixed_bits not in ALLOWED_BITS:
            raise ValueError(f"fixed_bits must be None or one of {ALLOWED_BITS}; got {self.fixed_bits!r}. "
                             "Fix: e.g. fixed_bits=4.")
        if self.on_budget_exceeded not in ON_BUDGET_EXCEEDED:
            raise ValueError(f"on_budget_exceeded must be one of {ON_BUDGET_EXCEEDED}; got "
                             f"{self.on_budget_exceeded!r}. Fix: on_budget_exceeded='warn'.")
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
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1]; got {fraction!r}. Fix: e.g. 0.9.")
