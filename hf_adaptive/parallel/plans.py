"""Parallel plans for N devices and their validation against a model's shape.

Contract: pure (no torch). A ``ParallelPlan`` is ``tp x pp x dp == world_size``: ``dp`` replicas, each a
pipeline of ``pp`` stages, each stage sharded over ``tp`` ranks. Rank layout (used by the engine):
``rank = dp_index * (tp * pp) + stage * tp + tp_rank``.

Tensor parallelism shards attention by whole KV-head groups, so ``tp`` must not exceed the number of
KV heads; with ``even_tp=True`` it must also divide heads, KV heads and the MLP width exactly (what
transformers' own ``tp_plan`` needs). Errors say which sizes would fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hf_adaptive.policy.parallel_policy import STRATEGIES


@dataclass(frozen=True)
class ModelDims:
    """The parts of a model config that constrain a plan."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        """Read from a transformers ``PretrainedConfig`` (or anything with the same attribute names)."""
        text = getattr(config, "text_config", None) or config
        heads = text.num_attention_heads
        return cls(num_layers=text.num_hidden_layers, num_heads=heads,
                   num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                   intermediate_size=text.intermediate_size)


@dataclass(frozen=True)
class ParallelPlan:
    """``tp`` ranks per stage, ``pp`` stages per replica, ``dp`` replicas."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelPlan.{name} must be an int >= 1, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def name(self) -> str:
        """Short label, e.g. ``tp2``, ``pp4``, ``dp2``, ``tp2xpp2``, ``single``."""
        parts = [f"{k}{v}" for k, v in (("tp", self.tp), ("pp", self.pp), ("dp", self.dp)) if v > 1]
        return "x".join(parts) or "single"

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(dp_index, stage, tp_rank)`` of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}) for plan {self.name}, got {rank}")
        return rank // (self.tp * self.pp), (rank // self.tp) % self.pp, rank % self.tp

    def rank_of(self, dp_index: int, stage: int, tp_rank: int) -> int:
        return dp_index * self.tp * self.pp + stage * self.tp + tp_rank

    @classmethod
    def parse(cls, text: str) -> ParallelPlan:
        """Inverse of ``name``: ``"tp2xpp2"`` -> ``ParallelPlan(tp=2, pp=2)``."""
        if text == "single":
            return cls()
        sizes: dict[str, int] = {}
        for part in text.split("x"):
            key, digits = part[:2], part[2:]
            if key not in ("tp", "pp", "dp") or not digits.isdigit():
                raise ValueError(f"plan must look like 'tp2', 'pp4', 'dp2', 'tp2xpp2' or 'single', got {text!r}")
            sizes[key] = int(digits)
        return cls(**sizes)


def factorizations(n: int) -> list[tuple[int, int]]:
    """All ``(tp, pp)`` with ``tp * pp == n`` and both > 1 (the hybrid candidates)."""
    return [(t, n // t) for t in range(2, n) if n % t == 0 and n // t > 1]


def fitting_tp_sizes(dims: ModelDims, even_tp: bool = False) -> list[int]:
    """TP sizes this model can be sharded over."""
    return [t for t in range(1, dims.num_kv_heads + 1) if tp_problem(dims, t, even_tp) is None]


def tp_problem(dims: ModelDims, tp: int, even_tp: bool) -> str | None:
    """Why ``tp`` does not fit ``dims``, or None."""
    if dims.num_heads % dims.num_kv_heads:
        return f"num_attention_heads={dims.num_heads} is not a multiple of num_key_value_heads={dims.num_kv_heads}"
    if tp > dims.num_kv_heads:
        return f"tp={tp} exceeds num_key_value_heads={dims.num_kv_heads} (attention is split by whole KV heads)"
    if tp > dims.intermediate_size:
        return f"tp={tp} exceeds intermediate_size={dims.intermediate_size}"
    if even_tp:
        for label, size in (("num_attention_heads", dims.num_heads), ("num_key_value_heads", dims.num_kv_heads),
                            ("intermediate_size", dims.intermediate_size)):
            if size % tp:
                return f"{label}={size} is not divisible by tp={tp}"
    return None


def validate_plan(plan: ParallelPlan, dims: ModelDims, world_size: int, even_tp: bool = False) -> None:
    """Raise ``ValueError`` naming what does not fit and what would."""
    if plan.world_size != world_size:
        raise ValueError(f"plan {plan.name} uses tp*pp*dp={plan.world_size} devices but world_size={world_size}; "
                         f"pick sizes whose product is {world_size}")
    problem = tp_problem(dims, plan.tp, even_tp)
    if problem:
        fits = fitting_tp_sizes(dims, even_tp)
        raise ValueError(f"plan {plan.name}: {problem}; tp sizes that fit this model: {fits}")
    if plan.pp > dims.num_layers:
        raise ValueError(f"plan {plan.name}: pp={plan.pp} stages but the model has only num_hidden_layers="
                         f"{dims.num_layers}; use pp <= {dims.num_layers}")


def plan_for_strategy(strategy: str, n_devices: int, dims: ModelDims, even_tp: bool = False) -> ParallelPlan:
    """The concrete plan for a policy strategy on ``n_devices``.

    ``hybrid`` takes the factorization with the largest TP that fits (TP keeps per-token latency low);
    where no factorization exists (``n_devices`` prime: 2, 3, ...) it takes TP over all devices if it fits,
    for the same reason (and this engine runs PP stages one after another, so PP splits memory but not
    time), else PP, which always splits memory. ``tp`` falls back to the hybrid/PP plan when the model cannot take TP over all devices.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    if n_devices == 1:
        return ParallelPlan()
    candidates = {
        "dp": [ParallelPlan(dp=n_devices)],
        "pp": [ParallelPlan(pp=n_devices)],
        "tp": [ParallelPlan(tp=n_devices)] + _hybrids(n_devices) + [ParallelPlan(pp=n_devices)],
        "hybrid": (_hybrids(n_devices) or [ParallelPlan(tp=n_devices)]) + [ParallelPlan(pp=n_devices)],
    }[strategy]
    errors = []
    for plan in candidates:
        try:
            validate_plan(plan, dims, n_devices, even_tp)
            return plan
        except ValueError as err:
            errors.append(str(err))
    raise ValueError(f"no {strategy} plan fits {n_devices} devices: " + "; ".join(errors))


def _hybrids(n: int) -> list[ParallelPlan]:
    return [ParallelPlan(tp=t, pp=p) for t, p in sorted(factorizations(n), reverse=True)]


def all_plans(n_devices: int, dims: ModelDims, even_tp: bool = False) -> list[ParallelPlan]:
    """Every valid pure or hybrid plan on ``n_devices`` (for benchmarks and the simulator)."""
    plans = [ParallelPlan(tp=n_devices), ParallelPlan(pp=n_devices), ParallelPlan(dp=n_devices)]
    plans += _hybrids(n_devices)
    out = []
    for plan in dict.fromkeys(plans):
        try:
            validate_plan(plan, dims, n_devices, even_tp)
            out.append(plan)
        except ValueError:
            continue
    return out
