"""The local sacrebleu ``evaluate`` module and the drift / agreement measures built on it."""

from __future__ import annotations

import pytest
import sacrebleu

from hf_adaptive.evaluation.metrics import (
    corpus_scores,
    load_sacrebleu_metric,
    quality_summary,
    relative_drift,
    self_bleu,
    token_agreement,
)

HYPS = ["the cat sat on the mat", "a dog ran in the park today"]
REFS = [["the cat sat on a mat", "there is a cat on the mat"],
        ["the dog ran in the park today", "a dog runs in a park today"]]


def test_local_module_matches_sacrebleu_with_two_references():
    """Guards against the evaluate wrapper transposing references wrongly (multi-ref BLEU must equal sacrebleu's)."""
    streams = [[r[0] for r in REFS], [r[1] for r in REFS]]
    scores = corpus_scores(HYPS, REFS)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, streams).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, streams).score)
    assert scores["bleu"] != pytest.approx(sacrebleu.corpus_bleu(HYPS, streams[:1]).score)
    assert scores["bleu_signature"].startswith("nrefs:2|")


def test_known_toy_bleu():
    """Guards against a changed tokenizer/smoothing: an exact match is 100, a disjoint output 0."""
    metric = load_sacrebleu_metric()
    same = metric.compute(predictions=["the quick brown fox jumps"], references=[["the quick brown fox jumps"]])
    assert same["score"] == pytest.approx(100.0)
    other = metric.compute(predictions=["zebra yak"], references=[["the quick brown fox jumps"]])
    assert other["score"] == pytest.approx(0.0)
    assert "tok:13a" in same["signature"]


def test_uneven_reference_counts_are_rejected():
    """Guards against silently dropping references when segments have different reference counts."""
    with pytest.raises(ValueError, match="same number of references"):
        load_sacrebleu_metric().compute(predictions=["a b", "c d"], references=[["a b"], ["c d", "c e"]],
                                        metric="bleu")


def test_drift_and_agreement():
    """Guards against sign/normalization errors in BLEU drift and the token agreement with the baseline."""
    assert relative_drift(27.0, 30.0) == pytest.approx(-0.1)
    assert relative_drift(0.0, 0.0) == 0.0
    agree = token_agreement([[1, 2, 3], [4, 5], [7]], [[1, 2, 4], [4, 5], [7, 8]])
    assert agree["token_match_rate"] == pytest.approx(5 / 7)
    assert agree["exact_match_fraction"] == pytest.approx(1 / 3)
    assert agree["mean_first_divergence"] == pytest.approx((2 + 2 + 1) / 3)
    assert self_bleu(HYPS, HYPS) == pytest.approx(100.0)


def test_quality_summary_of_baseline_has_zero_drift():
    """Guards against the baseline row comparing against something other than itself."""
    base = {"hypotheses": HYPS, "tokens": [[1, 2], [3]], "references": REFS}
    worse = {"hypotheses": ["the cat", "a dog"], "tokens": [[1, 9], [3]], "references": REFS}
    row = quality_summary("baseline", base, base)
    assert row["bleu_drift"] == 0.0 and row["token_match_rate"] == 1.0 and row["self_bleu"] == pytest.approx(100)
    low = quality_summary("kv4", worse, base)
    assert low["bleu_drift"] < 0 and low["token_match_rate"] == pytest.approx(2 / 3)
