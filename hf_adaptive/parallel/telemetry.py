"""What the serving loop did: per-request latency, per-plan throughput, switches, memory trend.

Contract: plain records (no torch); ``summarize`` reduces them, ``write_report`` writes JSON, Markdown
and a PNG (matplotlib, Agg). Also renders the Prometheus text served at ``/metrics``.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hf_adaptive.policy.parallel_policy import percentile


@dataclass
class RequestRecord:
    id: str
    plan: str
    arrival_s: float
    start_s: float
    finish_s: float
    prompt_tokens: int
    new_tokens: int
    tokens: list[int] = field(default_factory=list)

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s


@dataclass
class SwitchRecord:
    time_s: float
    from_plan: str
    to_plan: str
    reason: str
    cost_s: float  # slowest rank's re-shard time plus the control round trip


@dataclass
class Telemetry:
    """Thread-safe log of a serving run (the HTTP thread reads it for ``/metrics``)."""

    requests: list[RequestRecord] = field(default_factory=list)
    switches: list[SwitchRecord] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)
    memory: list[tuple[float, list[float]]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {"id", "time_s", "plan", "reason"}
    current_plan: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_batch(self, plan: str, start_s: float, end_s: float, records: list[RequestRecord],
                  memory_fraction: list[float]) -> None:
        with self.lock:
            self.requests.extend(records)
            self.batches.append({"plan": plan, "start_s": start_s, "end_s": end_s, "size": len(records),
                                 "new_tokens": sum(r.new_tokens for r in records)})
            self.memory.append((end_s, memory_fraction))

    def add_rejected(self, request_id: str, time_s: float, plan: str, reason: str) -> None:
        with self.lock:
            self.rejected.append({"id": request_id, "time_s": time_s, "plan": plan, "reason": reason})

    def summarize(self) -> dict[str, Any]:
        """Per-plan and overall throughput (generated tokens / busy seconds), p50/p99 latency, switches."""
        with self.lock:
            plans = sorted({b["plan"] for b in self.batches})
            per_plan = {p: _stats([r for r in self.requests if r.plan == p],
                                  [b for b in self.batches if b["plan"] == p]) for p in plans}
            overall = _stats(self.requests, self.batches)
            if self.requests:
                span = max(r.finish_s for r in self.requests) - min(r.arrival_s for r in self.requests)
                overall["wall_throughput_tok_s"] = sum(r.new_tokens for r in self.requests) / max(span, 1e-9)
            overall["rejected"] = len(self.rejected)
            overall["switches"] = len(self.switches)
            overall["switch_cost_s_total"] = sum(s.cost_s for s in self.switches)
            return {"overall": overall, "per_plan": per_plan,
                    "switches": [asdict(s) for s in self.switches], "rejected": list(self.rejected)}


def _stats(records: list[RequestRecord], batches: list[dict[str, Any]]) -> dict[str, Any]:
    busy = sum(b["end_s"] - b["start_s"] for b in batches)
    lat = [r.latency_s for r in records]
    return {"requests": len(records), "new_tokens": sum(r.new_tokens for r in records),
            "busy_s": busy, "throughput_tok_s": sum(r.new_tokens for r in records) / busy if busy else 0.0,
            "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99)}


def write_report(telemetry: Telemetry, out_dir: str | Path, meta: dict[str, Any], name: str = "serve") -> dict:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` under ``out_dir``; returns the JSON payload."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, **telemetry.summarize(),
               "requests": [dict(asdict(r), latency_s=r.latency_s) for r in telemetry.requests],
               "memory": telemetry.memory, "batches": telemetry.batches}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (out / f"{name}.md").write_text(_markdown(payload))
    _plot(telemetry, out / f"{name}.png", title=f"{name}: {meta.get('device', '')}")
    return payload


def _markdown(payload: dict[str, Any]) -> str:
    meta = payload["meta"]
    lines = [f"# Parallel serving run: {meta.get('mode', '')}", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()]
    lines += ["", "| plan | requests | new tokens | busy s | tok/s | p50 s | p99 s |", "|---|---|---|---|---|---|---|"]
    for plan, st in {**payload["per_plan"], "ALL": payload["overall"]}.items():
        lines.append(f"| {plan} | {st['requests']} | {st['new_tokens']} | {st['busy_s']:.3f} | "
                     f"{st['throughput_tok_s']:.1f} | {st['latency_p50_s']:.3f} | {st['latency_p99_s']:.3f} |")
    lines += ["", f"Switches: {payload['overall']['switches']} (total cost "
              f"{payload['overall']['switch_cost_s_total']:.3f} s)", ""]
    lines += [f"- {s['time_s']:.2f}s {s['from_plan']} -> {s['to_plan']} ({s['cost_s']:.3f}s): {s['reason']}"
              for s in payload["switches"]]
    rejected = payload.get("rejected", [])
    lines += ["", f"Rejected (do not fit any layout tried): {len(rejected)}", ""]
    lines += [f"- {r['time_s']:.2f}s {r['id']} on {r['plan']}: {r['reason']}" for r in rejected]
    return "\n".join(lines) + "\n"


def _plot(telemetry: Telemetry, path: Path, title: str) -> None:
    from hf_adaptive.evaluation.report import headless_pyplot, save_figure

    plt = headless_pyplot()

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    plans = sorted({r.plan for r in telemetry.requests})
    for plan in plans:
        rs = [r for r in telemetry.requests if r.plan == plan]
        ax1.scatter([r.finish_s for r in rs], [r.latency_s for r in rs], s=8, label=plan)
    for s in telemetry.switches:
        ax1.axvline(s.time_s, color="grey", lw=0.8, ls="--")
    ax1.set_ylabel("latency (s)")
    ax1.legend(fontsize=8)
    ax1.set_title(title)
    if telemetry.memory:
        ax2.plot([t for t, _ in telemetry.memory], [max(m, default=0.0) for _, m in telemetry.memory])
    ax2.set_ylabel("max memory fraction")
    ax2.set_xlabel("time (s)")
    save_figure(fig, path, dpi=100)
