"""Per-sequence confidence of one decode step, computed on device from RAW logits.

Contract: every function takes logits of shape (B, V) (any float dtype; computed in fp32) and returns
(B,) fp32 tensors on the same device. Nothing here reads a value back to the host, so a caller can
batch all host reads of a step into one transfer.

Default score: ``0.5*p_max + 0.3*(1 - entropy/4) + 0.2*margin/10`` clamped to [0, 1], with
entropy in nats and margin the top-1 minus top-2 logit. Weights and normalisers are configurable
through ``ConfidenceWeights``; its ``variance`` weight adds ``variance/variance_scale`` (0 by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_adaptive.validation import check_number


@dataclass(frozen=True)
class ConfidenceWeights:
    """Weights of the confidence score terms; normalisers turn raw metrics into ~[0, 1] terms."""

    p_max: float = 0.5
    entropy: float = 0.3
    margin: float = 0.2
    variance: float = 0.0
    entropy_scale_nats: float = 4.0
    margin_scale: float = 10.0
    variance_scale: float = 100.0

    def __post_init__(self) -> None:
        for name in ("p_max", "entropy", "margin", "variance"):
            check_number(getattr(self, name), f"ConfidenceWeights.{name}", minimum=0, fix=f"{name}=0.5 (0: unused)")
        for name in ("entropy_scale_nats", "margin_scale", "variance_scale"):
            check_number(getattr(self, name), f"ConfidenceWeights.{name}", minimum=0, min_open=True,
                         fix=f"{name}=4.0")


def confidence_metrics(logits: torch.Tensor, variance: bool = True) -> dict[str, torch.Tensor]:
    """Max softmax probability, entropy (nats), top-2 logit margin and logit variance.

    Few full-vocabulary passes (max, masked max, exp, two sums) because this runs inside every
    captured decode step: with z = x - max, s = sum(exp z): p_max = 1/s and
    entropy = log s - sum(exp(z) * z) / s.

    Args:
        logits: (B, V) raw logits of the last position.
        variance: False skips the variance pass (the default score does not use it).
    Returns:
        dict of (B,) fp32 tensors: ``p_max``, ``entropy``, ``margin`` and (if asked) ``variance``.
    """
    if logits.dim() != 2:
        raise ValueError(f"confidence_metrics: logits must be (B, V), got shape {tuple(logits.shape)}; "
                         "pass logits[:, -1, :] for a (B, T, V) model output")
    top, idx = logits.max(dim=-1)  # (B,), (B,) in the logits' dtype: exact
    # runner-up: the max once the top position is masked (a tie gives margin 0, as top-k would);
    # cheaper than a top-k selection over a 128k vocabulary
    second = logits.scatter(1, idx[:, None], float("-inf")).amax(-1) if logits.shape[-1] > 1 else top
    top = top.float()
    z = logits - top[:, None]  # (B, V) fp32 by promotion, <= 0; -inf where masked
    e = z.exp()
    s = e.sum(-1)
    # xlogy: e * log(e) with 0 * log 0 = 0, so masked (-inf) logits add nothing to the entropy
    p_max = s.reciprocal()
    entropy = torch.addcmul(s.log(), torch.xlogy(e, e).sum(-1), p_max, value=-1)
    out = {"p_max": p_max, "entropy": entropy, "margin": top - second}
    if variance:
        x = logits.float()
        finite = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
        out["variance"] = finite.var(dim=-1, unbiased=False)
    return out


def score_from_metrics(metrics: dict[str, torch.Tensor], weights: ConfidenceWeights) -> torch.Tensor:
    """Weighted confidence score in [0, 1], shape (B,).

    ``w_p*p_max + w_e*(1 - entropy/S_e) + w_m*margin/S_m`` written as scaled adds (one kernel each):
    in a captured decode step every op on these (B,) tensors is a launch of its own.
    """
    score = metrics["p_max"] * weights.p_max
    score = score.add_(metrics["entropy"], alpha=-weights.entropy / weights.entropy_scale_nats)
    score = score.add_(metrics["margin"], alpha=weights.margin / weights.margin_scale).add_(weights.entropy)
    if weights.variance:
        score = score.add_(metrics["variance"], alpha=weights.variance / weights.variance_scale)
    return score.clamp_(0.0, 1.0)


def confidence_score(logits: torch.Tensor, weights: ConfidenceWeights | None = None) -> torch.Tensor:
    """Confidence of each sequence, (B,) fp32 in [0, 1], from (B, V) raw logits."""
    weights = weights or ConfidenceWeights()
    return score_from_metrics(confidence_metrics(logits, variance=bool(weights.variance)), weights)
