"""Per-sequence confidence of one decode step, computed on device from RAW logits.

Contract: every function takes logits of shape (B, V) (any float dtype; computed in fp32) and returns
(B,) fp32 tensors on the same device. Nothing here reads a value back to the host, so a caller can
batch all host reads of a step into one transfer.

Default score (issue 7): ``0.5*p_max + 0.3*(1 - entropy/4) + 0.2*margin/10`` clamped to [0, 1], with
entropy in nats and margin the top-1 minus top-2 logit. Weights and normalisers are configurable
through ``ConfidenceWeights``; ``variance_weight`` adds ``variance/variance_scale`` (0 by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
        for name in ("entropy_scale_nats", "margin_scale", "variance_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ConfidenceWeights.{name} must be > 0, got {getattr(self, name)}")


def confidence_metrics(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Max softmax probability, entropy (nats), top-2 logit margin and logit variance.

    Args:
        logits: (B, V) raw logits of the last position.
    Returns:
        dict of (B,) fp32 tensors: ``p_max``, ``entropy``, ``margin``, ``variance``.
    """
    if logits.dim() != 2:
        raise ValueError(f"confidence_metrics: logits must be (B, V), got shape {tuple(logits.shape)}; "
                         "pass logits[:, -1, :] for a (B, T, V) model output")
    x = logits.float()
    log_p = torch.log_softmax(x, dim=-1)
    p = log_p.exp()
    # xlogy-style: p*log p is 0 where p underflows to 0 (masked -inf logits), never NaN
    entropy = -(p * log_p.clamp(min=torch.finfo(torch.float32).min)).sum(-1)
    top2 = torch.topk(x, k=min(2, x.shape[-1]), dim=-1).values
    margin = top2[:, 0] - top2[:, -1]
    finite = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    return {"p_max": p.amax(-1), "entropy": entropy, "margin": margin,
            "variance": finite.var(dim=-1, unbiased=False)}


def score_from_metrics(metrics: dict[str, torch.Tensor], weights: ConfidenceWeights) -> torch.Tensor:
    """Weighted confidence score in [0, 1], shape (B,)."""
    score = (weights.p_max * metrics["p_max"]
             + weights.entropy * (1.0 - metrics["entropy"] / weights.entropy_scale_nats)
             + weights.margin * metrics["margin"] / weights.margin_scale)
    if weights.variance:
        score = score + weights.variance * metrics["variance"] / weights.variance_scale
    return score.clamp(0.0, 1.0)


def confidence_score(logits: torch.Tensor, weights: ConfidenceWeights | None = None) -> torch.Tensor:
    """Confidence of each sequence, (B,) fp32 in [0, 1], from (B, V) raw logits."""
    return score_from_metrics(confidence_metrics(logits), weights or ConfidenceWeights())
