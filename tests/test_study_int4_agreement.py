"""eval/study_int4_agreement.py: int4's agreement with greedy native decoding, and the curves that judge each signal."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_eval_script, make_tiny_model

study = load_eval_script("study_int4_agreement")


def test_curve_takes_steps_by_descending_signal_and_keeps_ties_together():
    shares, rates = study.agreement_curve([0.9, 0.5, 0.9, 0.1], [1, 0, 0, 1])
    # the two 0.9 steps enter together (one of them disagrees), then 0.5 (disagrees), then 0.1
    assert shares == [0.5, 0.75, 1.0]
    assert rates == [0.5, pytest.approx(2 / 3), 0.5]
    assert study.rate_at_share(shares, rates, 0.6) == pytest.approx(2 / 3)
    assert study.rate_at_share(shares, rates, 0.5) == 0.5
    with pytest.raises(ValueError, match="must match"):
        study.agreement_curve([0.1], [1, 0])
    assert study.threshold_at_share([0.9, 0.5, 0.9, 0.1], 0.5) == 0.9
    assert study.threshold_at_share([0.9, 0.5, 0.9, 0.1], 0.6) == 0.5
    assert study.threshold_at_share([0.9, 0.5, 0.9, 0.1], 1.0) == 0.1
    assert study.threshold_at_share([], 0.5) is None


def test_judged_steps_read_the_signal_lag_steps_before():
    record = {"agree": [1, 0, 1, 0, 1], "int4_p_max": [0.1, 0.2, 0.3, 0.4, 0.5],
              "native": {"p_max": [0.9, 0.8, 0.7, 0.6, 0.5], "score": [10, 11, 12, 13, 14]}}
    assert study.judged(record, "score", 1) == ([11, 12, 13], [1, 0, 1])
    assert study.judged(record, "score", 2) == ([10, 11, 12], [1, 0, 1])
    assert study.judged(record, "int4_p_max", 1) == ([0.3, 0.4, 0.5], [1, 0, 1])
    assert study.judged(record, "min2_p_max", 1)[0] == [0.8, 0.7, 0.6]  # min of steps t-1 and t-2
    assert study.judged(record, "min2_p_max", 2)[0] == [0.9, 0.8, 0.7]  # step 0 has no step before it
    with pytest.raises(ValueError, match="lag"):
        study.judged(record, "score", 3)


def test_record_marks_where_the_judged_argmax_differs():
    native = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    other = torch.tensor([[3.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    record = study.verse_record(native, other, native.argmax(-1))
    assert record["agree"] == [1, 0, 1]
    assert set(record["native"]) == {"score", "p_max", "prob_margin", "margin", "neg_entropy"}
    assert record["native"]["margin"] == [3.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="same T steps"):
        study.verse_record(native, other[:2], native.argmax(-1))


def test_teacher_forced_top_tier_reproduces_greedy_decoding_and_int4_is_judged(tmp_path):
    """The alignment the study rests on: forcing the top tier over generate's own tokens agrees at every step; the int4
    tier is what gets judged by default, and the top tier is left active."""
    from hf_adaptive.precision.tiers import prepare_tiers

    model = make_tiny_model("llama")
    tiers = prepare_tiers(model, tiers=("int4", "fp32"))
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        top = study.decode_verse(model, tiers, ids, max_new=12, eos=-1, judge=tiers.top)
        int4 = study.decode_verse(model, tiers, ids, max_new=12, eos=-1)
    assert len(top["agree"]) == 12 and all(top["agree"])
    assert top["native"] == int4["native"]  # same greedy run
    assert int4["int4_p_max"] != top["int4_p_max"]  # another tier's logits
    assert tiers.active == tiers.top
    result = {"env": {}, "model": "tiny", "verses": [top, int4], "summary": study.summarize([top, int4])}
    (tmp_path / "agreement.json").write_text(json.dumps(result))
    assert study.main(["--render", str(tmp_path)]) == 0
    assert (tmp_path / "agreement.png").stat().st_size > 0 and "score@2" in (tmp_path / "agreement.md").read_text()


def test_dense_judge_matches_the_int4_kernel_and_restores_the_formats():
    """The dense judge (int4's dequantized values in plain matmuls) gives the kernel's verdicts, its logits match the
    kernel's one-row step, and the int4 formats are back once it closes (fused groups included)."""
    from hf_adaptive.precision.tiers import prepare_tiers

    model = make_tiny_model("llama")
    tiers = prepare_tiers(model, tiers=("int4", "fp32"))
    owners = tiers.modules + [g.fused for g in tiers.groups]
    before = {m: m.formats["int4"] for m in owners if "int4" in m.formats}
    assert before
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        kernel = study.decode_verse(model, tiers, ids, max_new=12, eos=-1)
        judge = study.DenseTier(tiers, "int4")
        dense = study.decode_verse(model, tiers, ids, max_new=12, eos=-1, dense=judge)
        check = study.kernel_check(model, tiers, torch.tensor([[1, 5, 9, 3, 7, 2, 4]]), judge)
    assert dense["agree"] == kernel["agree"]
    assert dense["int4_p_max"] == pytest.approx(kernel["int4_p_max"], abs=1e-4)
    assert check["argmax_equal"] and check["rel_diff"] < 1e-4
    assert {m: m.formats["int4"] for m in before} == before
    assert tiers.active == tiers.top


def test_cascade_rounds_keep_the_right_prefix_and_stop_on_the_drafts_own_doubt():
    agree = [1, 1, 1, 0, 1, 1]  # step 0 is the prefill's (the top tier's)
    own = [0.9, 0.9, 0.9, 0.2, 0.9, 0.9]
    # fixed k=8 from step 1: drafts 1..5 (the verse ends), keeps 1-2, the verifier adds step 3's token; then 4-5
    assert study.cascade_rounds(agree, own, cap=8, stop=None) == (2, 5, 7)
    # stop after the doubtful draft (step 3): 3 drafts, 2 kept + the verifier's token; then steps 4-5 (2 drafts)
    assert study.cascade_rounds(agree, own, cap=8, stop=0.5) == (2, 5, 5)
    # read one step late: one more draft (step 4) runs before the stop is seen
    assert study.cascade_rounds(agree, own, cap=8, stop=0.5, lag=1) == (2, 5, 6)
    # ... unless the doubtful draft is among the first `sync` steps, read at once (it is the third: sync 3 covers it)
    assert study.cascade_rounds(agree, own, cap=8, stop=0.5, lag=1, sync=2) == (2, 5, 6)
    assert study.cascade_rounds(agree, own, cap=8, stop=0.5, lag=1, sync=3) == (2, 5, 5)
    # k=1: every round drafts one token; step 3's draft is wrong, so that round emits only the verifier's token
    assert study.cascade_rounds(agree, own, cap=1, stop=None) == (3, 5, 3)
    rows = study.cascade_table([{"agree": agree, "int4_p_max": own}])
    k1 = next(r for r in rows if r["cascade"] == "fixed k=1")
    assert k1["tokens_per_verify"] == pytest.approx(5 / 3) and k1["speedup@0.5"] == pytest.approx(5 / (3 + 1.5))
