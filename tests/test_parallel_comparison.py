"""The adaptive-vs-best-static verdict of the serving benchmark (pure)."""

import pytest

from hf_adaptive.parallel.comparison import Targets, compare_with_static, concurrency_lines, verdict_lines

GOAL = Targets(min_speedup=1.25, max_p99_ratio=0.8)  # the caller's goal; the library holds none


def _row(requests, tok_s, p99, rejected=0):
    return {"requests": requests, "rejected": rejected, "wall_throughput_tok_s": tok_s, "latency_p99_s": p99}


def test_best_static_is_the_fastest_plan_that_served_everything():
    rows = {"adaptive": _row(10, 300.0, 8.0), "tp4": _row(10, 200.0, 12.0), "pp4": _row(10, 150.0, 9.0),
            "dp4": _row(8, 900.0, 1.0, rejected=2)}
    v = compare_with_static(rows, total_requests=10, failed={"tp2xpp2": "exit status 124 (timed out)"}, targets=GOAL)
    assert v["best_static"] == "tp4" and v["lowest_p99_static"] == "pp4"
    assert set(v["excluded"]) == {"dp4", "tp2xpp2"} and "2 refused" in v["excluded"]["dp4"]
    a = v["adaptive"]["adaptive"]
    assert a["speedup_vs_best"] == pytest.approx(1.5) and a["p99_ratio_vs_best"] == pytest.approx(8 / 12)
    assert a["p99_ratio_vs_lowest_p99"] == pytest.approx(8 / 9)
    assert a["served_all"] and a["meets_target"]
    assert any("target met" in line for line in verdict_lines(v))


@pytest.mark.parametrize("adaptive, why", [(_row(10, 240.0, 8.0), "too slow"), (_row(10, 300.0, 10.0), "p99"),
                                           (_row(9, 400.0, 1.0, rejected=1), "refused one")])
def test_target_not_met(adaptive, why):
    v = compare_with_static({"adaptive": adaptive, "tp4": _row(10, 200.0, 12.0)}, total_requests=10, targets=GOAL)
    assert not v["adaptive"]["adaptive"]["meets_target"], why
    assert any("NOT met" in line for line in verdict_lines(v))


def test_no_complete_static_plan_and_bad_input():
    v = compare_with_static({"adaptive": _row(10, 1.0, 1.0), "dp2": _row(5, 9.0, 1.0, rejected=5)}, 10, targets=GOAL)
    assert v["best_static"] is None and v["adaptive"] == {}
    assert "nothing to compare" in "\n".join(verdict_lines(v))
    with pytest.raises(ValueError, match="total_requests"):
        compare_with_static({}, 0, targets=GOAL)


def test_concurrency_lines_flag_a_per_replica_cap():
    per_replica = concurrency_lines(["adaptive", "dp4", "tp4", "tp2xpp2"], 8, "replica")
    assert "dp4 32, tp4 8, tp2xpp2 8" in per_replica[0]
    assert len(per_replica) == 2 and "Unequal concurrency" in per_replica[1]
    assert "--max-batch-per device" in per_replica[1]
    per_device = concurrency_lines(["dp4", "tp4", "pp4", "tp2xpp2"], 8, "device")
    assert per_device == ["Batch cap: 8 rows per device; rows in flight at most: dp4 32, tp4 32, pp4 32, tp2xpp2 32 "
                          "(memory admission may allow fewer)."]
    assert concurrency_lines(["adaptive"], 8, "replica") == []
    with pytest.raises(ValueError, match="--max-batch-per"):
        concurrency_lines(["tp2"], 8, "gpu")


def test_targets_are_the_callers_and_are_recorded():
    """Guards the library holding a goal of its own: without targets it refuses, and a looser goal flips the verdict."""
    rows = {"adaptive": _row(10, 220.0, 11.0), "tp4": _row(10, 200.0, 12.0)}
    with pytest.raises(TypeError):
        compare_with_static(rows, 10)
    strict = compare_with_static(rows, 10, targets=GOAL)
    loose = compare_with_static(rows, 10, targets=Targets(min_speedup=1.05, max_p99_ratio=0.95))
    assert not strict["adaptive"]["adaptive"]["meets_target"] and loose["adaptive"]["adaptive"]["meets_target"]
    assert loose["targets"] == {"min_speedup": 1.05, "max_p99_ratio": 0.95}
    with pytest.raises(ValueError, match="min_speedup"):
        Targets(min_speedup=0, max_p99_ratio=0.8)
