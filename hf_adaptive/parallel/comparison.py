"""Adaptive vs the best static plan, from per-mode run summaries, checked against targets the caller names.

Contract: pure (plain dicts in, a dict out); the library compares, the caller (a benchmark) holds the targets. A static plan is a candidate only if it served every request of the
trace: a plan that refused part of it (memory) or did not finish is listed with the reason, not compared, since
its throughput counts less work. "Best" is the highest throughput; the p99 target is checked against that plan
and, separately, against the lowest static p99 (the stricter reading).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hf_adaptive.parallel.capacity import replica_rows
from hf_adaptive.parallel.plans import ParallelPlan


@dataclass(frozen=True)
class Targets:
    """What "adaptive meets the target" means: at least ``min_speedup`` x the best static plan's throughput and
    at most ``max_p99_ratio`` x its p99 latency."""

    min_speedup: float
    max_p99_ratio: float

    def __post_init__(self) -> None:
        if not (self.min_speedup > 0 and self.max_p99_ratio > 0):
            raise ValueError(f"Targets: min_speedup and max_p99_ratio must be > 0, got {self.min_speedup!r} and "
                             f"{self.max_p99_ratio!r}; e.g. Targets(min_speedup=1.25, max_p99_ratio=0.8)")


def compare_with_static(rows: dict[str, dict[str, Any]], total_requests: int, failed: dict[str, str] | None = None,
                        *, targets: Targets, throughput_key: str = "wall_throughput_tok_s") -> dict[str, Any]:
    """Compare every ``adaptive*`` mode of ``rows`` with the static modes that served all ``total_requests``.

    Args:
        rows: mode -> summary with ``requests``, ``rejected``, ``latency_p99_s`` and ``throughput_key``.
        total_requests: requests in the trace.
        failed: modes that did not finish -> why (excluded, listed).
        throughput_key: which throughput to compare; wall-clock by default, so switch time counts against the
            adaptive engine (busy-time throughput leaves re-sharding out).
        targets: what counts as meeting the target (the caller's goal, recorded in the result).

    Returns:
        ``{"best_static", "lowest_p99_static", "excluded", "adaptive": {mode: {...ratios, "meets_target"}}}``;
        ``best_static`` is None when no static plan served the whole trace.
    """
    if total_requests < 1:
        raise ValueError(f"total_requests must be >= 1 (requests in the trace), got {total_requests}")
    excluded = {mode: why for mode, why in (failed or {}).items() if not mode.startswith("adaptive")}
    complete = {}
    for mode, row in rows.items():
        if mode.startswith("adaptive"):
            continue
        if row.get("rejected", 0) or row["requests"] < total_requests:
            excluded[mode] = (f"served {row['requests']} of {total_requests} requests "
                              f"({row.get('rejected', 0)} refused)")
        else:
            complete[mode] = row
    out: dict[str, Any] = {"throughput_key": throughput_key, "targets": {"min_speedup": targets.min_speedup,
                                                                         "max_p99_ratio": targets.max_p99_ratio},
                           "best_static": None, "lowest_p99_static": None, "excluded": excluded, "adaptive": {}}
    if not complete:
        return out
    best = max(complete, key=lambda m: complete[m][throughput_key])
    lowest = min(complete, key=lambda m: complete[m]["latency_p99_s"])
    out["best_static"], out["lowest_p99_static"] = best, lowest
    for mode, row in rows.items():
        if not mode.startswith("adaptive"):
            continue
        speedup = row[throughput_key] / max(complete[best][throughput_key], 1e-12)
        p99_ratio = row["latency_p99_s"] / max(complete[best]["latency_p99_s"], 1e-12)
        p99_vs_lowest = row["latency_p99_s"] / max(complete[lowest]["latency_p99_s"], 1e-12)
        served_all = row["requests"] >= total_requests and not row.get("rejected", 0)
        out["adaptive"][mode] = {
            "served_all": served_all, "speedup_vs_best": speedup, "p99_ratio_vs_best": p99_ratio,
            "p99_ratio_vs_lowest_p99": p99_vs_lowest,
            "meets_target": served_all and speedup >= targets.min_speedup and p99_ratio <= targets.max_p99_ratio}
    return out


def verdict_lines(verdict: dict[str, Any]) -> list[str]:
    """Markdown lines for a ``compare_with_static`` result."""
    t = verdict["targets"]
    lines = ["", f"## Adaptive vs the best static plan (targets: >= {t['min_speedup']}x throughput, "
                 f"<= {t['max_p99_ratio']}x p99; throughput = `{verdict['throughput_key']}`)", ""]
    if verdict["best_static"] is None:
        lines.append("No static plan served the whole trace: nothing to compare with.")
    else:
        lines.append(f"Best static plan (served every request, highest throughput): **{verdict['best_static']}**; "
                     f"lowest static p99: {verdict['lowest_p99_static']}.")
    lines += [f"- not compared: {mode}: {why}" for mode, why in verdict["excluded"].items()]
    for mode, v in verdict["adaptive"].items():
        lines.append(f"- **{mode}**: {v['speedup_vs_best']:.2f}x throughput, {v['p99_ratio_vs_best']:.2f}x p99 of "
                     f"{verdict['best_static']} ({v['p99_ratio_vs_lowest_p99']:.2f}x the lowest static p99); "
                     f"served every request: {v['served_all']}; **target {'met' if v['meets_target'] else 'NOT met'}**")
    return lines


def concurrency_lines(plan_names: list[str], max_batch: int, per: str) -> list[str]:
    """Markdown lines stating how many rows each plan may batch at once under the cap ``(max_batch, per)``.

    Throughput ratios between plans mean little when the cap lets one plan run more rows than another (with
    ``per="replica"`` DP over N devices batches N times the rows of TP or PP); the lines then say so and name the
    flag that equalises them. ``plan_names`` are plan names (``"tp2"``, ``"dp4"``); adaptive modes are skipped.
    """
    plans = [ParallelPlan.parse(n) for n in plan_names if not n.startswith("adaptive")]
    rows = {p.name: replica_rows(p, max_batch, per) * p.dp for p in plans}
    if not rows:
        return []
    lines = [f"Batch cap: {max_batch} rows per {per}; rows in flight at most: "
             + ", ".join(f"{name} {n}" for name, n in rows.items()) + " (memory admission may allow fewer)."]
    if len(set(rows.values())) > 1:
        lines.append(f"**Unequal concurrency:** the plans above may batch different numbers of rows, so their "
                     f"throughputs are not compared like for like; `--max-batch-per device` gives every plan "
                     f"{max_batch} rows per device.")
    return lines
