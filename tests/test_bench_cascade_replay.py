"""eval/bench_cascade_replay.py: the draft cascade replaying recorded acceptance through model.generate."""

from __future__ import annotations

import json

import pytest

from helpers import load_eval_script

from hf_adaptive.compat import forward_cache_kwargs

ROUNDS = [["self", 3, 2, 3, 0.9], ["lookup", 4, 4, 5, 0.8], ["none", 0, 0, 1, 0.5], ["self", 2, 0, 1, 0.7]]


@pytest.fixture(scope="module")
def bench():
    return load_eval_script("bench_cascade_replay")


def _schedule(path, runs=("cascade",), **recording):
    verse = {"runs": {run: {"rounds": ROUNDS, "rounds_columns": ["drafter", "proposed", "accepted", "emitted", "score"]}
                      for run in runs}}
    path.write_text(json.dumps({"verses": [verse, verse], **recording}))
    return path


def test_rounds_load_in_order_and_a_missing_run_is_refused(bench, tmp_path):
    """Guards the schedule reader: every verse's rounds of the chosen run, in order, as (drafter, proposed, accepted);
    a run the file does not hold names the flag and the recorder."""
    path = _schedule(tmp_path / "acc.json")
    assert bench.load_rounds(path, "cascade") == [(r[0], r[1], r[2]) for r in ROUNDS] * 2
    with pytest.raises(ValueError, match="no rounds of run 'self'.*record_draft_acceptance"):
        bench.load_rounds(path, "self")


def test_replay_of_an_own_confidence_recording_runs_the_stop_without_firing(bench, tmp_path):
    """Guards the replay of a ``--self-stop`` recording: its self-drafts compute and read their p_max as the product
    does, the replay model's wide margins keep the stop from cutting a recorded draft short (so the recorded lengths
    are what runs), and the output stays greedy's with the recorded counts kept."""
    path = _schedule(tmp_path / "acc.json", runs=("self",), self_stop=0.7, max_self_draft=3)
    assert bench.recorded_stop(path) == (0.7, 3)
    out = tmp_path / "out"
    bench.main(["--device", "cpu", "--dtype", "float32", "--shape", "tiny", "--contexts", "24", "--new-tokens", "14",
                "--repeats", "1", "--schedule", str(path), "--run", "self", "--out", str(out),
                "--self-stop-sync", "0,2"])
    row, second = json.loads((out / "bench_cascade_replay_tiny.json").read_text())["rows"]
    assert row["cascade_eager_identical"] is True and row["cascade_eager_accepted_as_scheduled"] == 1.0
    assert row["cascade_eager_stops_fired"] == 0
    # one row per self_stop_sync, the eager cascade (slow, and no late reads off CUDA) only in the first
    assert (row["self_stop_sync"], second["self_stop_sync"]) == (0, 2) and "cascade_eager_ms" not in second


def test_replay_drafts_the_late_reads_extra_token_past_the_synced_steps(bench, tmp_path):
    """Guards the replay's cost of a late stop read: a recorded self round stopped at its token k < cap drafts one
    token more where the CUDA drafter reads that token's p_max one step late (k > self_stop_sync), none where it was
    read at once, and a round that ran to the cap none."""
    tiers = bench.prepare_tiers(bench.build_model("tiny", "cpu", bench.torch.float32), tiers=("int4", "native"))
    reference = bench.torch.zeros(1, 64, dtype=bench.torch.long)
    ids = bench.torch.ones(1, 9, dtype=bench.torch.long)
    rounds = [("self", 1, 0), ("self", 2, 1), ("self", 4, 4)]

    def proposed(sync):
        gen = bench.ReplayCandidateGenerator(tiers, reference, rounds, (0.7, 4), sync)
        gen.late = True  # as on CUDA
        gen.bind(bench.DynamicCache(), None, 64)
        tiers.model(ids[:, :-1], use_cache=True, **forward_cache_kwargs(tiers.model, gen.cache))
        return [gen.get_candidates(ids)[0].shape[1] - ids.shape[1] for _ in rounds]

    assert proposed(0) == [2, 3, 4]
    assert proposed(1) == [1, 3, 4]
    assert proposed(2) == [1, 2, 4]


def test_replay_keeps_the_recorded_counts_and_greedys_tokens(bench, tmp_path):
    """Guards the replay end to end on CPU (float32, exact), eager and compiled (dynamo's eager backend): through
    generate's cascade loop the verifier keeps exactly the recorded accepted counts (self-drafts and lookups doing
    their real work), each mode's output equals greedy decoding's, and the report carries the baselines' and both
    cascades' ms per token."""
    out = tmp_path / "out"
    bench.main(["--device", "cpu", "--dtype", "float32", "--shape", "tiny", "--contexts", "24", "--new-tokens", "14",
                "--repeats", "1", "--schedule", str(_schedule(tmp_path / "acc.json")), "--out", str(out),
                "--compile-on-cpu", "--compile-backend", "eager"])
    report = json.loads((out / "bench_cascade_replay_tiny.json").read_text())
    (row,) = report["rows"]
    for mode in ("cascade_eager", "cascade_compiled", "cascade_captured"):
        assert row[f"{mode}_identical"] is True and row[f"{mode}_diverged_at"] is None, mode
        assert row[f"{mode}_accepted_as_scheduled"] == 1.0, mode
    # 13 tokens after the prefill's: rounds of 3, 5, 1, 1 emitted tokens, then 3: 5 verify forwards
    assert row["verify_forwards"] == 5 and row["tokens_per_verify"] == pytest.approx(13 / 5)
    assert {"native_eager_ms", "native_compiled_ms", "cascade_eager_ms", "cascade_compiled_ms",
            "cascade_compiled_vs_native_compiled", "native_captured_ms", "native_captured_overlapped_ms",
            "cascade_captured_vs_native_captured_overlapped"} <= set(row)
    assert (out / "bench_cascade_replay_tiny.png").stat().st_size > 0


@pytest.mark.parametrize("value", ["-1", "x", ","])
def test_bad_self_stop_sync_is_refused_before_any_work(bench, value, capsys):
    """Guards the flag's check: a negative or unreadable count stops the run at parsing, naming the flag, instead of
    failing inside the timed modes."""
    with pytest.raises(SystemExit):
        bench.parse_args(["--schedule", "x.json", "--self-stop-sync", value])
    assert "--self-stop-sync" in capsys.readouterr().err
