"""An ``evaluate`` metric module wrapping sacrebleu's corpus BLEU and chrF, loaded from disk (no hub).

Load it with ``evaluate.load(<path of this directory>)``; ``hf_adaptive.evaluation.metrics`` does that.
Each prediction may have several references (a list of strings); all predictions must have the same
number of them, as sacrebleu scores parallel reference streams.
"""

from __future__ import annotations

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = "Corpus BLEU and chrF computed by sacrebleu, with its reproducibility signature."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, one hypothesis per segment.
    references: list of list of str, the references of each segment (same count for every segment).
    metric: "bleu" (default) or "chrf".
    tokenize: BLEU tokenizer, default "13a" (sacrebleu's default).
    lowercase: BLEU on lowercased text, default False.
Returns:
    score (float, 0-100), signature (str); BLEU also gives counts, totals, precisions, bp,
    sys_len, ref_len.
"""
_METRICS = ("bleu", "chrf")


class SacrebleuLocal(evaluate.Metric):
    """sacrebleu corpus BLEU / chrF with multiple references."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, 2018. A Call for Clarity in Reporting BLEU Scores.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("string", id="sequence"),
                "references": datasets.Sequence(datasets.Value("string", id="sequence"), id="references"),
            }),
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references, metric: str = "bleu", tokenize: str = "13a",
                 lowercase: bool = False) -> dict:
        if metric not in _METRICS:
            raise ValueError(f"metric={metric!r} is not supported; use one of {_METRICS}.")
        counts = {len(refs) for refs in references}
        if len(counts) != 1:
            raise ValueError(f"references: every prediction needs the same number of references, got "
                             f"counts {sorted(counts)}; pad or drop segments so the counts match.")
        streams = [list(stream) for stream in zip(*references)]  # (n_refs, n_segments)
        if metric == "chrf":
            scorer = sacrebleu.CHRF()
            score = scorer.corpus_score(predictions, streams)
            return {"score": score.score, "signature": str(scorer.get_signature())}
        scorer = sacrebleu.BLEU(tokenize=tokenize, lowercase=lowercase)
        score = scorer.corpus_score(predictions, streams)
        return {"score": score.score, "signature": str(scorer.get_signature()), "counts": score.counts,
                "totals": score.totals, "precisions": score.precisions, "bp": score.bp,
                "sys_len": score.sys_len, "ref_len": score.ref_len}
