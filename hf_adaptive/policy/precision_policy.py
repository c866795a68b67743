"""Which precision tier runs the next decode step: a pure decision over plain numbers (no torch).

Contract: ``PrecisionPolicy.decide(scores)`` takes the per-sequence confidences of the step that just
finished (floats in [0, 1]) and returns the tier name for the NEXT forward. A batch runs one tier per
step, so the per-sequence scores are first combined into one batch score (``combine``):

- ``"min"`` (default): the least confident sequence decides; safest, a batch drops to the top tier as
  soon as one sequence is unsure.
- ``"quantile"``: the ``quantile``-th quantile (linear interpolation) of the scores; ``quantile=0.1``
  lets the few least confident sequences (10 %) be outvoted, trading quality for speed.
- ``"mean"``: the mean score.

Bands (defaults in ``PrecisionPolicyConfig``): score > ``high`` -> ``fast_tier``; ``low`` <= score <= ``high`` ->
``mid_tier``; score < ``low`` -> ``top_tier``. ``min_dwell_steps`` keeps a tier for at least that many
steps before switching again (fewer switches, e.g. for kernels with a switch cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hf_adaptive.validation import check_number, check_type

COMBINE_MODES = ("min", "quantile", "mean")


@dataclass(frozen=True)
class PrecisionPolicyConfig:
    """Thresholds and tier names of the confidence -> precision ladder."""

    high: float = 0.9
    low: float = 0.6
    fast_tier: str = "int4"
    mid_tier: str = "native"
    top_tier: str = "native"
    combine: str = "min"
    quantile: float = 0.1
    min_dwell_steps: int = 1
    initial_tier: str | None = None  # None -> top_tier (prefill logits decide the first decode step)

    def __post_init__(self) -> None:
        for name in ("high", "low", "quantile"):
            check_number(getattr(self, name), f"PrecisionPolicyConfig.{name}", minimum=0.0, maximum=1.0,
                         fix="PrecisionPolicyConfig(high=0.9, low=0.6)")
        for name in ("fast_tier", "mid_tier", "top_tier"):
            check_type(getattr(self, name), f"PrecisionPolicyConfig.{name}", str, f"{name}='native'")
        if self.initial_tier is not None:
            check_type(self.initial_tier, "PrecisionPolicyConfig.initial_tier", str, "initial_tier=None (top tier)")
        check_number(self.min_dwell_steps, "PrecisionPolicyConfig.min_dwell_steps", minimum=1, integer=True,
                     fix="min_dwell_steps=1")
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"PrecisionPolicyConfig: need 0 <= low <= high <= 1, got low={self.low}, "
                             f"high={self.high}; pass e.g. low=0.6, high=0.9")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"PrecisionPolicyConfig.combine must be one of {COMBINE_MODES}, got "
                             f"{self.combine!r}; use 'min' for the safest batch decision")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"PrecisionPolicyConfig.quantile must be in [0, 1], got {self.quantile}")
        if self.min_dwell_steps < 1:
            raise ValueError(f"PrecisionPolicyConfig.min_dwell_steps must be >= 1, got {self.min_dwell_steps}")

    @property
    def tiers(self) -> tuple[str, ...]:
        """The distinct tier names this policy can return, fast to top."""
        return tuple(dict.fromkeys((self.fast_tier, self.mid_tier, self.top_tier)))


def combine_scores(scores: list[float], mode: str = "min", quantile: float = 0.1) -> float:
    """One batch score from per-sequence scores (see the module docstring for the modes)."""
    if not scores:
        raise ValueError("combine_scores: scores is empty; pass one confidence per sequence")
    if mode == "min":
        return min(scores)
    if mode == "mean":
        return sum(scores) / len(scores)
    if mode == "quantile":
        ordered = sorted(scores)
        pos = quantile * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
    raise ValueError(f"combine_scores: mode must be one of {COMBINE_MODES}, got {mode!r}")


def tier_for_score(score: float, config: PrecisionPolicyConfig) -> str:
    """The band a batch score falls into: > high fast, [low, high] mid, < low top."""
    if score > config.high:
        return config.fast_tier
    if score >= config.low:
        return config.mid_tier
    return config.top_tier


@dataclass
class PrecisionPolicy:
    """Stateful wrapper: applies the dwell rule and remembers the current tier."""

    config: PrecisionPolicyConfig = field(default_factory=PrecisionPolicyConfig)
    current: str = ""
    steps_in_tier: int = 0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Back to the initial tier (call before each new generation)."""
        self.current = self.config.initial_tier or self.config.top_tier
        self.steps_in_tier = 0

    def decide(self, scores: list[float]) -> str:
        """Tier for the next forward, given this step's per-sequence confidences."""
        return self.apply(tier_for_score(combine_scores(scores, self.config.combine, self.config.quantile),
                                         self.config))

    def apply(self, wanted: str) -> str:
        """Tier for the next forward, given the band's tier already chosen (e.g. on the device)."""
        self.steps_in_tier += 1
        if wanted != self.current and self.steps_in_tier >= self.config.min_dwell_steps:
            self.current, self.steps_in_tier = wanted, 0
        return self.current


def draft_length(score: float, max_draft: int, config: PrecisionPolicyConfig) -> int:
    """Verified mode: how many tokens the fast tier drafts next, from the top tier's last confidence.

    Above ``high`` the full ``max_draft``; in the mid band half of it (at least 1); below ``low`` none
    (the top tier decodes alone, a draft would most likely be rejected).
    """
    if max_draft < 0:
        raise ValueError(f"draft_length: max_draft must be >= 0, got {max_draft}")
    if score > config.high:
        return max_draft
    if score >= config.low:
        return max(1, max_draft // 2) if max_draft else 0
    return 0


def expected_tokens_per_round(draft_len: int, accept_rate: float) -> float:
    """Tokens one draft/verify round emits when each draft token is accepted with ``accept_rate``
    independently: accepted prefix plus the verifier's own token, ``(1 - a^(k+1)) / (1 - a)``."""
    if draft_len < 0 or not 0.0 <= accept_rate <= 1.0:
        raise ValueError(f"expected_tokens_per_round: need draft_len >= 0 and accept_rate in [0, 1], got "
                         f"{draft_len}, {accept_rate}")
    if accept_rate == 1.0:
        return float(draft_len + 1)
    return (1.0 - accept_rate ** (draft_len + 1)) / (1.0 - accept_rate)


def verified_speedup(native_step_ms: float, draft_step_ms: float, verify_ms: float,
                     tokens_per_round: float, draft_len: int) -> float:
    """Cost model of verified mode vs native decode, one token per native step.

    A round costs ``draft_len`` draft steps plus one verify forward of ``draft_len + 1`` tokens and emits
    ``tokens_per_round`` tokens, which native decode makes in as many native steps. Host time between
    steps is ignored (the graph path keeps the GPU busy), so this is an upper bound of the measured one.
    """
    if min(native_step_ms, draft_step_ms, verify_ms) <= 0 or draft_len < 0:
        raise ValueError("verified_speedup: step times must be > 0 ms and draft_len >= 0; got "
                         f"{native_step_ms}, {draft_step_ms}, {verify_ms}, {draft_len}")
    return tokens_per_round * native_step_ms / (draft_len * draft_step_ms + verify_ms)
