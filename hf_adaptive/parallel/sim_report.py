"""Run the simulator over every static plan and the adaptive policy; write JSON, Markdown and a PNG.

Contract: the comparison and its report only; the scheduling lives in ``simulator.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hf_adaptive.parallel.cost_model import Calibration
from hf_adaptive.parallel.plans import ModelDims, ParallelPlan, plan_for_strategy
from hf_adaptive.parallel.requests import Request
from hf_adaptive.parallel.simulator import SimConfig, SimResult, simulate
from hf_adaptive.policy.parallel_policy import ParallelPolicy, ParallelPolicyConfig


def compare_plans(requests: list[Request], calib: Calibration, dims: ModelDims,
                  policy_config: ParallelPolicyConfig, config: SimConfig = SimConfig()) -> list[SimResult]:
    """One run per calibrated static plan, then the adaptive run (last)."""

    def plan_for(strategy: str) -> ParallelPlan:
        plan = plan_for_strategy(strategy, calib.world_size, dims)
        if plan.name not in calib.plans:
            raise ValueError(f"strategy {strategy!r} maps to plan {plan.name}, which the calibration lacks "
                             f"(has {sorted(calib.plans)}); calibrate it")
        return plan

    results = [simulate(requests, calib, plan_for, static_plan=ParallelPlan.parse(name), config=config)
               for name in sorted(calib.plans)]
    results.append(simulate(requests, calib, plan_for, policy=ParallelPolicy(policy_config), config=config,
                            name="adaptive"))
    return results


def write_sim_report(trace_name: str, results: list[SimResult], calib: Calibration, out_dir: Path,
                     meta: dict[str, Any]) -> dict[str, Any]:
    """``<trace>.json``, ``<trace>.md`` and ``<trace>.png`` under ``out_dir``; returns the JSON payload."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r.summary(calib.world_size) for r in results]
    adaptive = results[-1]
    payload = {"trace": trace_name, "meta": meta, "calibration_meta": calib.meta, "results": rows,
               "adaptive_switches": [{"time_s": t, "from": a, "to": b, "reason": why}
                                     for t, a, b, why in adaptive.switches]}
    (out_dir / f"{trace_name}.json").write_text(json.dumps(payload, indent=1))
    lines = [f"# Simulated parallel plans: `{trace_name}`", "",
             f"Calibration: {calib.meta.get('measured_on', '?')} ({calib.meta.get('device', '?')}), "
             f"world size {calib.world_size}. Command: `{meta.get('command', '')}`", "",
             "| run | requests | rejected | tok/s | p50 s | p99 s | utilisation | switches |",
             "|---|---|---|---|---|---|---|---|"]
    for s in rows:
        lines.append(f"| {s['name']} | {s['requests']} | {s['rejected']} | {s['throughput_tok_s']:.1f} | "
                     f"{s['latency_p50_s']:.3f} | {s['latency_p99_s']:.3f} | {s['utilisation']:.2f} | "
                     f"{s['switches']} |")
    lines += ["", "Adaptive switches:"] + [f"- {t:.2f}s {a} -> {b}: {why}" for t, a, b, why in adaptive.switches]
    (out_dir / f"{trace_name}.md").write_text("\n".join(lines) + "\n")
    _plot(trace_name, rows, adaptive, out_dir / f"{trace_name}.png")
    return payload


def mode_bars(axes: Any, rows: dict[str, dict], panels: list[tuple[str, str]]) -> None:
    """One bar panel per ``(row key, title)``: every mode's value, adaptive modes in orange; a mode that refused
    part of the trace (``rejected`` > 0) is hatched, since its numbers count less work. Shared by the simulator's
    and the serving benchmark's plots."""
    names = list(rows)
    colors = ["tab:orange" if n.startswith("adaptive") else "tab:blue" for n in names]
    hatch = ["//" if rows[n].get("rejected", 0) else "" for n in names]
    for ax, (key, title) in zip(axes, panels):
        ax.bar(names, [rows[n].get(key, 0.0) for n in names], color=colors, hatch=hatch)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)


def _plot(trace_name: str, rows: list[dict], adaptive: SimResult, path: Path) -> None:
    from hf_adaptive.evaluation.report import headless_pyplot, save_figure

    plt = headless_pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    mode_bars(axes[:3], {r["name"]: {**r, "rejected": 0} for r in rows},
              [("throughput_tok_s", "throughput (tok/s)"), ("latency_p50_s", "p50 latency (s)"),
               ("latency_p99_s", "p99 latency (s)")])
    plans = sorted({p for _, p, _ in adaptive.timeline})
    axes[3].scatter([t for t, _, _ in adaptive.timeline], [plans.index(p) for _, p, _ in adaptive.timeline], s=6)
    axes[3].set_yticks(range(len(plans)), plans)
    axes[3].set_title("adaptive plan over time")
    axes[3].set_xlabel("s")
    fig.suptitle(trace_name)
    save_figure(fig, path, dpi=100)
