"""eval/bench_generate.py: the user-facing decode benchmark (plain model.generate, every cache)."""

from __future__ import annotations

import pytest

from helpers import load_eval_script


@pytest.fixture(scope="module")
def bench():
    return load_eval_script("bench_generate")


def test_ratios_compare_within_one_shape(bench):
    """Guards the ratio table: each adaptive cache over static and dynamic at the same (shape, context, batch),
    skipped rows left out, never a ratio across shapes."""
    rows = [
        {"shape": "s", "cache": "static", "context": 64, "batch": 1, "decode_ms_per_token": 2.0},
        {"shape": "s", "cache": "dynamic", "context": 64, "batch": 1, "decode_ms_per_token": 8.0},
        {"shape": "s", "cache": "adaptive16", "context": 64, "batch": 1, "decode_ms_per_token": 2.1},
        {"shape": "s", "cache": "adaptive4", "context": 64, "batch": 1, "decode_ms_per_token": 1.5},
        {"shape": "s", "cache": "static", "context": 32768, "batch": 8, "decode_ms_per_token": 24.0},
        {"shape": "s", "cache": "adaptive4", "context": 32768, "batch": 8, "skipped": "OutOfMemoryError"},
    ]
    small, big = bench.ratios(rows)
    assert small["adaptive16/static"] == pytest.approx(1.05) and small["adaptive4/dynamic"] == pytest.approx(0.1875)
    assert small["adaptive4/adaptive16"] == pytest.approx(1.5 / 2.1)
    assert set(big) == {"shape", "context", "batch"}  # nothing measured to compare with at 32k x 8


def test_cli_refuses_unknown_caches(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--caches", "dynamic,compiled4"])
    assert bench.parse_args(["--caches", "static,adaptive4"]).caches == ["static", "adaptive4"]


def test_budget_cache_switches_precision_within_one_call(bench):
    """Guards the adaptive_budget configuration: its budget must move the ladder during a call (it is the row
    that measures switches under pressure), again after the reset that reuses it for the next call, and a reused
    static cache must keep its buffers across calls."""
    import torch

    model = bench.build_model("tiny", "cpu", torch.float32)
    args = bench.parse_args(["--device", "cpu", "--residual-length", "64"])
    cache, impl = bench.make_cache("adaptive_budget", model, 700, 600, 1, args)
    bench.set_attention(model, impl)
    ids = torch.randint(10, 500, (1, 600), generator=torch.Generator().manual_seed(0))
    bench.generate_once(model, ids, cache, 40, "cpu")
    first = bench._bits_path(cache)
    assert first.count("->") >= 1, first
    again = bench._fresh(cache, "adaptive_budget", model, 700, 600, 1, args)  # reused, so no new buffers
    assert again is cache
    bench.generate_once(model, ids, cache, 40, "cpu")
    assert bench._bits_path(cache) == first  # reset: the next call starts at 16 bits and walks the ladder again
    static, _ = bench.make_cache("adaptive4", model, 700, 600, 1, args)
    bench.generate_once(model, ids, static, 3, "cpu")
    before = static.layers[0].tail_k.data_ptr()
    assert bench._fresh(static, "adaptive4", model, 700, 600, 1, args) is static
    assert static.layers[0].tail_k.data_ptr() == before


def test_report_is_written_after_every_configuration(bench, tmp_path):
    """Guards what a run cut by an outer time limit leaves: the report is rewritten after each configuration, with
    how many of the planned ones it holds."""
    import json

    import torch

    args = bench.parse_args(["--device", "cpu", "--dtype", "float32", "--shape", "tiny", "--contexts", "32",
                             "--batch-sizes", "1", "--caches", "dynamic,adaptive4", "--new-tokens", "4",
                             "--repeats", "1", "--out", str(tmp_path)])
    model = bench.build_model("tiny", "cpu", torch.float32)
    done = []

    def on_row(rows):
        bench.write_results(rows, args, "cpu", {"identical": True}, 1.0, 2)
        report = json.loads((tmp_path / "bench_generate_tiny.json").read_text())
        done.append((report["environment"]["configurations_done"], len(report["rows"])))

    bench.bench(model, args, on_row)
    assert done == [(1, 1), (2, 2)]
    assert (tmp_path / "bench_generate_tiny.png").stat().st_size > 0


def test_rounds_time_every_configuration_again_and_keep_the_median(bench, tmp_path):
    """Guards --rounds: each measured configuration is timed once per round, in grid order, and its ms/token is the
    median of its rounds."""
    import math
    import statistics

    import torch

    args = bench.parse_args(["--device", "cpu", "--dtype", "float32", "--shape", "tiny", "--contexts", "32",
                             "--batch-sizes", "1", "--caches", "dynamic,adaptive4", "--new-tokens", "4",
                             "--repeats", "1", "--rounds", "3", "--max-tokens-in-flight", "1000",
                             "--out", str(tmp_path)])
    model = bench.build_model("tiny", "cpu", torch.float32)
    rows = bench.bench(model, args)
    for row in rows:
        # a difference of two wall times: on a busy CPU host one round can come out negative, so only finiteness holds
        assert len(row["round_ms"]) == 3 and all(math.isfinite(ms) for ms in row["round_ms"])
        assert row["decode_ms_per_token"] == pytest.approx(statistics.median(row["round_ms"]))
        assert len(row["ms_runs_streamed"]) == 1 and math.isfinite(row["decode_ms_streamed"])  # the first round's call
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])


@pytest.fixture(scope="module")
def timing():
    return load_eval_script("_generate_timing")


def test_step_clock_times_decode_steps_only(timing):
    """Guards decode_ms_streamed: the streamer's first put is the prompt (before the prefill), so the estimate spans
    the first to the last new token, per step; with fewer than two new tokens there is nothing to time."""
    clock = timing.StepClock()
    for stamp in (0.0, 1.0, 1.004, 1.008, 1.012):  # prompt at 0 s, a 1 s prefill, then three 4 ms steps
        clock.stamps.append(stamp)
    assert clock.decode_ms_per_token() == pytest.approx(4.0)
    short = timing.StepClock()
    short.stamps += [0.0, 1.0]
    assert short.decode_ms_per_token() is None


def test_stamps_are_the_prompt_then_each_new_token(timing):
    """Guards what the stamps mean on a real generate call: a streamer sees the prompt once, before the prefill, and
    each new token once, so a call of N new tokens leaves N + 1 stamps and the estimate skips the prefill."""
    import torch

    model = timing.build_model("tiny", "cpu", torch.float32)
    clock = timing.StepClock()
    ids = torch.randint(10, 500, (1, 48), generator=torch.Generator().manual_seed(0))
    timing.generate_once(model, ids, None, 6, "cpu", streamer=clock)
    assert len(clock.stamps) == 7 and clock.decode_ms_per_token() > 0
