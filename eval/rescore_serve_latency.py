"""Re-score a serving benchmark's latencies from the trace's arrival times.

    python eval/rescore_serve_latency.py eval/results/parallel_serve_mixed_smollm2_h100x2

For runs recorded before ``Controller.submit`` stamped arrivals: the controller then stamped a request's arrival when it took it from its inbox, i.e. after
the batch that was running when it arrived, so recorded latencies left out up to one batch of waiting. Each
``<mode>.json`` keeps every request's finish time, so the true latency is ``finish_s - arrival_s * time_scale``
with the trace's own arrival times (the trace replay starts right after the controller's clock, after prompt
preparation: this over-counts by that gap, well under a second). Writes ``latency_from_trace.json`` and
``latency_from_trace.md`` (with the adaptive-vs-best-static verdict on the corrected numbers) in the directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import SERVING_TARGETS

from hf_adaptive.parallel.comparison import compare_with_static, verdict_lines
from hf_adaptive.parallel.requests import load_trace
from hf_adaptive.policy.parallel_policy import percentile


def rescore(run: dict, arrivals: dict[str, float]) -> dict:
    """Latency percentiles and wall throughput of one ``<mode>.json`` payload against trace arrivals."""
    scale = float(run["meta"].get("time_scale", 1.0))
    requests = run["requests"]
    missing = [r["id"] for r in requests if r["id"] not in arrivals]
    if missing:
        raise ValueError(f"requests {missing[:3]} are not in the trace; pass the trace the run replayed "
                         f"({run['meta'].get('trace')})")
    lat = [r["finish_s"] - arrivals[r["id"]] * scale for r in requests]
    span = max(r["finish_s"] for r in requests) - min(arrivals[r["id"]] * scale for r in requests)
    return {"requests": len(requests), "rejected": run["overall"].get("rejected", 0),
            "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
            "recorded_latency_p99_s": run["overall"]["latency_p99_s"],
            "wall_throughput_tok_s": sum(r["new_tokens"] for r in requests) / max(span, 1e-9)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a parallel_serve_bench.py --out directory (serve_bench.json + <mode>.json)")
    p.add_argument("--trace", help="the trace it replayed (default: the one its reports name)")
    args = p.parse_args()
    run_dir = Path(args.run_dir)
    bench = json.loads((run_dir / "serve_bench.json").read_text())
    trace = args.trace or bench["meta"]["trace"]
    arrivals = {r.id: r.arrival_s for r in load_trace(trace)}
    rows = {mode: rescore(json.loads((run_dir / f"{mode}.json").read_text()), arrivals) for mode in bench["runs"]}
    failed = {m: f["failed"] for m, f in bench["meta"].get("failed_modes", {}).items()}
    verdict = compare_with_static(rows, len(arrivals), failed, targets=SERVING_TARGETS)
    (run_dir / "latency_from_trace.json").write_text(json.dumps({"trace": trace, "rows": rows, "verdict": verdict},
                                                                indent=1))
    lines = [f"# Latency from the trace's arrival times: `{run_dir}`", "", f"Trace `{trace}`. Command: "
             f"`python eval/rescore_serve_latency.py {args.run_dir}`", "",
             "| mode | served | refused | tok/s (wall) | p50 s | p99 s | p99 s as recorded |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {r['requests']} | {r['rejected']} | {r['wall_throughput_tok_s']:.1f} | {r['latency_p50_s']:.2f} "
              f"| {r['latency_p99_s']:.2f} | {r['recorded_latency_p99_s']:.2f} |" for m, r in rows.items()]
    (run_dir / "latency_from_trace.md").write_text("\n".join(lines + verdict_lines(verdict)) + "\n")
    print("\n".join(lines + verdict_lines(verdict)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
