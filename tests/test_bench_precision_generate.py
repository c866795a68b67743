"""eval/bench_precision_generate.py: precision switching timed through plain model.generate."""

from __future__ import annotations

import json
import math

import pytest

from helpers import load_eval_script


@pytest.fixture(scope="module")
def bench():
    return load_eval_script("bench_precision_generate")


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_spread_pattern_runs_the_fraction_evenly(bench, fraction):
    """Guards the switching modes' schedule: exactly a fraction f of the steps in the fast tier, never two runs of
    fast steps where one would do (f = 0.5 alternates), and a reset starts the pattern over."""
    pattern = bench.SpreadPattern(fraction, "int4", "native")
    tiers = [pattern.decide([0.5]) for _ in range(40)]
    assert tiers.count("int4") == int(40 * fraction)
    if fraction == 0.5:
        assert tiers[:4] == ["native", "int4", "native", "int4"]
    pattern.reset()
    assert pattern.current == "native" and [pattern.decide([0.5]) for _ in range(40)] == tiers


def test_cpu_run_reports_every_mode_and_leaves_the_model_clean(bench, tmp_path):
    """Guards the benchmark end to end on CPU: every (cache, mode) row is measured, the switching modes ran their
    int4 fraction through the real controller (its telemetry), predictions are computed, the report is written."""
    args = ["--device", "cpu", "--dtype", "float32", "--shape", "tiny", "--contexts", "24", "--new-tokens", "9",
            "--repeats", "1", "--fractions", "0.5", "--out", str(tmp_path)]
    bench.main(args)
    report = json.loads((tmp_path / "bench_precision_generate_tiny.json").read_text())
    rows = {(r["cache"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == {(c, m) for c in ("static", "adaptive16") for m in ("native", "int4", "never", "f=0.5")}
    for cache in ("static", "adaptive16"):
        assert rows[(cache, "never")]["int4_fraction"] == 0.0 and rows[(cache, "never")]["switches"] == 0
        half = rows[(cache, "f=0.5")]
        assert 0.4 <= half["int4_fraction"] <= 0.5 and half["switches"] >= 6
        # differences of wall times: finite, but on a busy CPU host not always positive
        assert math.isfinite(half["predicted_ms"]) and math.isfinite(half["vs_predicted"])
        assert rows[(cache, "native")]["vs_native"] == 1.0
    assert report["environment"]["configurations_done"] == report["environment"]["configurations_planned"] == 2
    assert (tmp_path / "bench_precision_generate_tiny.png").stat().st_size > 0
    assert "vs_predicted" in (tmp_path / "bench_precision_generate_tiny.md").read_text()


def test_profile_covers_the_mode_with_and_the_mode_without_a_controller(bench, tmp_path):
    """Guards --profile: native and never-switching calls of the first configuration are profiled (device ms, launches
    and host ms per token in their rows, op tables beside the result); other modes and configurations are not."""
    args = ["--device", "cpu", "--dtype", "float32", "--shape", "tiny", "--contexts", "24,32", "--new-tokens", "5",
            "--repeats", "1", "--fractions", "0.5", "--caches", "static", "--profile", "--out", str(tmp_path)]
    bench.main(args)
    report = json.loads((tmp_path / "bench_precision_generate_tiny.json").read_text())
    profiled = {(r["context"], r["mode"]) for r in report["rows"] if "host_ms_per_token" in r}
    assert profiled == {(24, "native"), (24, "never")}
    for r in report["rows"]:
        if (r["context"], r["mode"]) in profiled:
            assert r["kernel_launches_per_token"] >= 0 and r["host_ms_per_token"] > 0
    for mode in ("native", "never"):
        assert (tmp_path / f"profile_static_{mode}_n24_b1.cpu.txt").stat().st_size > 0
        assert "cumulative" in (tmp_path / f"profile_static_{mode}_n24_b1.host.txt").read_text()


def test_a_mode_leaves_no_controller_hook_and_the_top_tier_on(bench, tmp_path):
    """Guards the modes against each other: after a switching mode, the model carries no controller hook and runs
    its top tier, so the next mode (native) measures the plain model."""
    import torch

    from hf_adaptive.precision.tiers import prepare_tiers

    args = bench.parse_args(["--device", "cpu", "--dtype", "float32", "--shape", "tiny", "--new-tokens", "5",
                             "--repeats", "1", "--out", str(tmp_path)])
    model = bench.build_model("tiny", "cpu", torch.float32)
    hooks = (len(model._forward_pre_hooks), len(model.lm_head._forward_hooks))
    tiers = prepare_tiers(model, tiers=("int4", "native"))
    cache = bench.make_cache("static", model, 64)
    ids = bench.prompt(model.config.vocab_size, 1, 16, 0, "cpu")
    row = bench.run_mode(model, tiers, "f=0.5", 0.5, ids, lambda: (cache.reset(), cache)[1], args, None)
    assert row["switches"] > 0 and tiers.active == tiers.top
    assert (len(model._forward_pre_hooks), len(model.lm_head._forward_hooks)) == hooks


def test_guard_sets_time_the_grid_on_a_model_per_set_and_profile_the_named_mode(bench, tmp_path):
    """Guards --guard-sets and --profile-modes: each guard set gets its own rows (its own model, prepared with that
    lean_guards) and its own predictions; only the named mode of the first guard set is profiled, under a file name
    that keeps the fraction."""
    args = ["--device", "cpu", "--dtype", "float32", "--shape", "tiny", "--contexts", "24", "--new-tokens", "5",
            "--repeats", "1", "--fractions", "0.5", "--caches", "static", "--guard-sets", "lean,full", "--profile",
            "--profile-modes", "f=0.5", "--out", str(tmp_path)]
    bench.main(args)
    report = json.loads((tmp_path / "bench_precision_generate_tiny.json").read_text())
    rows = {(r["guards"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == {(g, m) for g in ("lean", "full") for m in ("native", "int4", "never", "f=0.5")}
    assert all(math.isfinite(rows[(g, "f=0.5")]["vs_predicted"]) for g in ("lean", "full"))
    assert {k for k, r in rows.items() if "host_ms_per_token" in r} == {("lean", "f=0.5")}
    assert (tmp_path / "profile_static_f0p5_n24_b1.cpu.txt").stat().st_size > 0
    assert report["environment"]["configurations_done"] == 2


@pytest.mark.parametrize("flag, value", [("--guard-sets", "lean,tight"), ("--profile-modes", "f=0.3")])
def test_unknown_guard_set_or_profiled_mode_is_refused(bench, flag, value, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args([flag, value])
    assert flag in capsys.readouterr().err


def test_paths_time_each_configuration_through_both_calls_and_uninstall(bench, tmp_path):
    """Guards --paths: every (cache, mode) is timed once per path, the rows say which, and the captured path's step
    graphs are installed only while its configuration runs (generate's own compiled call is back after it)."""
    built = []
    build = bench.build_model
    bench.build_model = lambda *a, **kw: built.append(build(*a, **kw)) or built[-1]
    try:
        bench.main(["--device", "cpu", "--dtype", "float32", "--shape", "tiny", "--contexts", "24", "--new-tokens",
                    "5", "--repeats", "1", "--fractions", "0.5", "--caches", "static", "--paths", "trees,captured",
                    "--out", str(tmp_path)])
    finally:
        bench.build_model = build
    rows = json.loads((tmp_path / "bench_precision_generate_tiny.json").read_text())["rows"]
    assert {(r["path"], r["mode"]) for r in rows} == {(p, m) for p in ("trees", "captured")
                                                      for m in ("native", "int4", "never", "f=0.5")}
    assert all(("step_replays" in r) == (r["path"] == "captured") for r in rows)
    call = built[0].get_compiled_call  # prepare_tiers' lean guard filter, not the captured path's wrapper
    assert not call.__qualname__.startswith("DecodeGraphs") and call.__qualname__.startswith("install.")
