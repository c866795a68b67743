"""Translation quality: corpus BLEU/chrF (sacrebleu via a local ``evaluate`` module) and drift.

Contract: plain strings and token-id lists in, plain numbers out; never loads a model. BLEU drift is
the relative change of a setting's BLEU against the baseline's; agreement compares a setting's output
with the baseline's own output (token match rate, exact match, self-BLEU).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

METRIC_DIR = Path(__file__).resolve().parent / "sacrebleu_local"


@functools.lru_cache(maxsize=1)
def load_sacrebleu_metric() -> Any:
    """The local sacrebleu ``evaluate`` module (loaded once; never contacts the hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
    import evaluate

    return evaluate.load(str(METRIC_DIR))


def corpus_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Corpus BLEU and chrF of ``hypotheses`` against per-segment reference lists.

    Args:
        hypotheses: one string per segment.
        references: per segment, its references (the same count for every segment).

    Returns:
        ``{"bleu", "chrf", "bleu_signature", "chrf_signature", "bleu_detail"}``.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"references: got {len(references)} segments for {len(hypotheses)} hypotheses; "
                         "pass one reference list per hypothesis.")
    metric = load_sacrebleu_metric()
    refs = [list(r) for r in references]
    bleu = metric.compute(predictions=list(hypotheses), references=refs, metric="bleu")
    chrf = metric.compute(predictions=list(hypotheses), references=refs, metric="chrf")
    return {"bleu": bleu["score"], "chrf": chrf["score"], "bleu_signature": bleu["signature"],
            "chrf_signature": chrf["signature"],
            "bleu_detail": {k: bleu[k] for k in ("precisions", "bp", "sys_len", "ref_len")}}


def relative_drift(value: float, baseline: float) -> float:
    """``(value - baseline) / baseline``; 0.0 when both are 0, ``inf``-signed when only baseline is 0."""
    if baseline == 0:
        return 0.0 if value == 0 else float("inf") if value > 0 else float("-inf")
    return (value - baseline) / baseline


def token_agreement(tokens: Sequence[Sequence[int]], baseline: Sequence[Sequence[int]]) -> dict[str, float]:
    """How closely generated token ids follow the baseline's, segment by segment.

    Returns:
        ``token_match_rate``: positions with the same id / positions in the longer of each pair
        (summed over segments); ``exact_match_fraction``: share of identical segments;
        ``mean_first_divergence``: mean index of the first differing token (length if none).
    """
    if len(tokens) != len(baseline):
        raise ValueError(f"tokens: got {len(tokens)} segments, baseline has {len(baseline)}; "
                         "compare outputs of the same examples.")
    matched = total = exact = 0
    first_div: list[int] = []
    for a, b in zip(tokens, baseline):
        same = [x == y for x, y in zip(a, b)]
        matched += sum(same)
        total += max(len(a), len(b))
        exact += int(list(a) == list(b))
        first_div.append(same.index(False) if False in same else min(len(a), len(b)))
    n = max(len(tokens), 1)
    return {"token_match_rate": matched / total if total else 1.0, "exact_match_fraction": exact / n,
            "mean_first_divergence": sum(first_div) / n}


def self_bleu(hypotheses: Sequence[str], baseline_hypotheses: Sequence[str]) -> float:
    """BLEU of a setting's output with the baseline's output as the only reference (100 = identical)."""
    return corpus_scores(hypotheses, [[b] for b in baseline_hypotheses])["bleu"]


def quality_summary(name: str, result: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, Any]:
    """Scores, drift and agreement of one setting's translations against the baseline's.

    Args:
        result / baseline: dicts with ``hypotheses`` (list of str), ``tokens`` (list of id lists) and
            ``references`` (list of reference lists).
    """
    scores = corpus_scores(result["hypotheses"], result["references"])
    base = corpus_scores(baseline["hypotheses"], baseline["references"])
    summary = {"setting": name, **scores,
               "bleu_drift": relative_drift(scores["bleu"], base["bleu"]),
               "chrf_drift": relative_drift(scores["chrf"], base["chrf"]),
               "self_bleu": self_bleu(result["hypotheses"], baseline["hypotheses"])}
    summary.update(token_agreement(result["tokens"], baseline["tokens"]))
    return summary
