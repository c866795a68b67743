"""The controller's per-step decision as device tensor math, so it can live inside a captured graph.

Contract: ``DeviceDecision(policy, ladder, weights)(logits)`` maps (B, V) raw logits to a (1 + B,) fp32
``status`` tensor ``[tier index, score_0 .. score_{B-1}]`` without any host read: the same confidence
function as ``PrecisionController`` (``confidence.confidence_score``), the policy's ``combine`` mode and
its bands (score > high -> fast, >= low -> mid, else top) as tensor ops. ``tier index`` indexes the
``ladder`` given at construction. The dwell rule stays on the host (``PrecisionPolicy.apply``): it is
state that must follow the tier that really ran, which only the host knows.

Equality with the eager controller: the scores are bit-identical (same function, same logits); the
combined score and the band comparisons run in float64, as Python's float comparisons in
``precision_policy`` do, so ``min`` (exact) gives identical bands; ``mean`` / ``quantile`` may differ in
the last float64 bit (reduction order), which only matters for a score exactly on a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hf_adaptive.policy.precision_policy import PrecisionPolicyConfig
from hf_adaptive.precision.confidence import ConfidenceWeights, confidence_score


@dataclass(frozen=True)
class DeviceDecision:
    """Confidence -> band -> tier index, as tensor ops (capturable in a CUDA graph)."""

    policy: PrecisionPolicyConfig
    ladder: tuple[str, ...]
    weights: ConfidenceWeights = field(default_factory=ConfidenceWeights)
    _cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)  # device -> tables

    def __post_init__(self) -> None:
        missing = [t for t in self.policy.tiers if t not in self.ladder]
        if missing:
            raise ValueError(f"DeviceDecision: policy tiers {missing} are not in ladder {self.ladder}; "
                             "pass the PrecisionTiers.ladder the policy's tiers were prepared in")

    def tier_name(self, index: float) -> str:
        """Ladder name of a status' tier index (read back from the host copy)."""
        return self.ladder[int(index)]

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) scores -> () float64 batch score, as ``combine_scores`` does on the host."""
        s = scores.double()
        if s.shape[0] == 1:  # every mode combines one score into itself: save the launches
            return s.reshape(())
        if self.policy.combine == "min":
            return s.amin()
        if self.policy.combine == "mean":
            return s.mean()
        return torch.quantile(s, self.policy.quantile, interpolation="linear")

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Band edges (float64) and band -> ladder index (fp32), made once per device (before capture)."""
        key = str(device)
        if key not in self._cache:
            # bucketize(right=True) puts x in band i where edge[i-1] <= x < edge[i]: score == low is mid
            # (>= low), and score == high must stay mid (> high is fast), so the upper edge is the next
            # float64 after high
            high_up = torch.nextafter(torch.tensor(self.policy.high, dtype=torch.float64),
                                      torch.tensor(2.0, dtype=torch.float64))
            edges = torch.stack([torch.tensor(self.policy.low, dtype=torch.float64), high_up]).to(device)
            bands = (self.policy.top_tier, self.policy.mid_tier, self.policy.fast_tier)
            table = torch.tensor([float(self.ladder.index(t)) for t in bands], device=device)
            self._cache[key] = (edges, table)
        return self._cache[key]

    def band_index(self, batch_score: torch.Tensor) -> torch.Tensor:
        """() float64 -> (1,) fp32 ladder index of the band's tier (no data-dependent control flow)."""
        edges, table = self._tables(batch_score.device)
        band = torch.bucketize(batch_score.reshape(1), edges, right=True)  # (1,) int64 in {0, 1, 2}
        return table.index_select(0, band)  # not table[band]: a 0-d index tensor is read on the host

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) raw logits -> (1 + B,) fp32 status ``[tier index, scores...]`` on the same device."""
        scores = confidence_score(logits, self.weights)  # (B,)
        index = self.band_index(self.combine(scores))
        return torch.cat([index, scores])
