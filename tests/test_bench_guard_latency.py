"""eval/bench_guard_latency.py: the guards of generate's compiled decode step, counted from dynamo's own log."""

from __future__ import annotations

import json

from helpers import load_eval_script


def test_guard_count_grows_with_the_tiered_linears(tmp_path):
    """Guards the measurement: each variant compiles in a fresh dynamo state, its guard lines and dynamo's guard eval
    latency are read from the "guards" log artifact, and the tiered model (formats, fused groups, the selector) has
    more guards than the plain one; the per-step lookup comes from the profiler."""
    bench = load_eval_script("bench_guard_latency")
    bench.main(["--layers", "2", "--variants", "plain,tiers", "--new-tokens", "4", "--repeats", "2", "--out", str(tmp_path)])
    rows = {r["variant"]: r for r in json.loads((tmp_path / "guard_latency.json").read_text())["rows"]}
    assert rows["tiers"]["guards"] > rows["plain"]["guards"] > 100
    for row in rows.values():
        assert row["cache_entries"] >= 1 and row["guard_eval_us"] > 0 and row["lookup_us_per_step"] > 0
