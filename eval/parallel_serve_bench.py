"""Real multi-process serving of a trace: the adaptive engine vs each static plan.

    python eval/parallel_serve_bench.py --model PATH --gpus 2 --trace eval/traces/mixed_small.jsonl \
        --out runs/serve_2gpu            # add --cpu for gloo processes on CPU

Each mode is one ``hf-adaptive launch`` (accelerate launch -> ``hf_adaptive.parallel.worker``): the
adaptive policy (live re-sharding from the host copy), with ``--calibration`` also the cost-aware rule
(``adaptive_cost``), then every valid static plan for ``--gpus``.
Collects each run's ``<mode>.json`` and writes ``serve_bench.json``, ``serve_bench.md`` and
``serve_bench.png`` (throughput, p50/p99 latency, switches, switch cost) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _common import SERVING_TARGETS, pyplot, save_figure
from tqdm import tqdm

from hf_adaptive.parallel.comparison import compare_with_static, concurrency_lines, verdict_lines
from hf_adaptive.parallel.launch import LaunchConfig, build_launch, run_launch
from hf_adaptive.parallel.plans import ModelDims, all_plans
from hf_adaptive.parallel.requests import load_trace
from hf_adaptive.parallel.sim_report import mode_bars


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--trace", default="eval/traces/mixed_small.jsonl")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--time-scale", type=float, default=0.5, help="compress trace arrival times")
    p.add_argument("--modes", nargs="*", help="subset of: adaptive, adaptive_cost and plan names (default: all)")
    p.add_argument("--calibration", help="adds the mode adaptive_cost (cost-aware rule on this calibration)")
    p.add_argument("--port", type=int, default=0,
                   help="rendezvous port of the first mode (the next modes add 1 each); 0: a free port per mode")
    p.add_argument("--mode-timeout-s", type=float, default=None,
                   help="kill a mode that runs longer (recorded as failed; the other modes still run)")
    p.add_argument("--out", required=True)
    p.add_argument("worker_args", nargs=argparse.REMAINDER, help="-- then extra worker arguments (policy knobs)")
    return p.parse_args()


def modes_for(args: argparse.Namespace) -> list[str]:
    from transformers import AutoConfig

    from hf_adaptive.models import resolve_model_dir

    dims = ModelDims.from_config(AutoConfig.from_pretrained(resolve_model_dir(args.model)))
    modes = ["adaptive"] + (["adaptive_cost"] if args.calibration else []) + [p.name for p in all_plans(args.gpus, dims)]
    return [m for m in args.modes if m in modes] if args.modes else modes  # --modes also sets the order


def run_mode(mode: str, args: argparse.Namespace, port: int) -> dict:
    worker = ["--out", args.out, "--name", mode, "--trace", args.trace, "--dtype", args.dtype,
              "--time-scale", str(args.time_scale)] + [a for a in args.worker_args if a != "--"]
    if mode == "adaptive_cost":
        worker += ["--rule", "cost", "--calibration", args.calibration]
    config = LaunchConfig(model=args.model, gpus=args.gpus, plan="auto" if mode.startswith("adaptive") else mode,
                          cpu=args.cpu, main_process_port=port, worker_args=tuple(worker))
    cmd, env = build_launch(config, os.environ)
    start = time.perf_counter()
    rc = run_launch(cmd, env, args.mode_timeout_s)
    if rc != 0:
        return {"failed": f"exit status {rc}" + (" (timed out)" if rc == 124 else ""), "command": " ".join(cmd)}
    payload = json.loads((Path(args.out) / f"{mode}.json").read_text())
    payload["overall"]["launch_wall_s"] = time.perf_counter() - start
    return payload


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    failed = {}
    for i, mode in enumerate(tqdm(modes_for(args), desc="modes")):
        result = run_mode(mode, args, args.port + i if args.port else 0)
        if "failed" in result:
            failed[mode] = result
            print(f"mode {mode} failed: {result['failed']}", file=sys.stderr)
        else:
            runs[mode] = result
    if not runs:
        raise SystemExit(f"every mode failed: {failed}")
    rows = {m: r["overall"] | {"switches_detail": r["switches"]} for m, r in runs.items()}
    meta = next(iter(runs.values()))["meta"] | {"command": " ".join(["python"] + sys.argv),  # no machine path
                                               "time_scale": args.time_scale}
    meta.pop("mode", None)
    meta.pop("policy_switches", None)
    meta["failed_modes"] = failed
    verdict = compare_with_static(rows, len(load_trace(args.trace)), {m: f["failed"] for m, f in failed.items()},
                                  targets=SERVING_TARGETS)
    (out / "serve_bench.json").write_text(json.dumps({"meta": meta, "runs": rows, "verdict": verdict}, indent=1))
    write_markdown(out / "serve_bench.md", meta, rows, verdict)
    plot(out / "serve_bench.png", rows, meta)
    return 0


def write_markdown(path: Path, meta: dict, rows: dict, verdict: dict) -> None:
    lines = [f"# Adaptive vs static parallel plans ({meta['device']} x {meta['world_size']})", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, model `{meta['model']}` {meta['dtype']}, "
             f"trace `{meta['trace']}` (time scale {meta['time_scale']})", "", f"Command: `{meta['command']}`", "",
             *concurrency_lines(_plans_run(rows), meta.get("max_batch", 8),
                                meta.get("max_batch_per", "replica")), "",
             "| mode | requests served | rejected | tok/s (busy) | tok/s (wall) | p50 s | p99 s | switches | switch cost s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, r in rows.items():
        lines.append(f"| {mode} | {r['requests']} | {r.get('rejected', 0)} | {r['throughput_tok_s']:.1f} | {r.get('wall_throughput_tok_s', 0):.1f} | "
                     f"{r['latency_p50_s']:.3f} | {r['latency_p99_s']:.3f} | {r['switches']} | "
                     f"{r['switch_cost_s_total']:.3f} |")
    lines += [f"- {mode} FAILED: {f['failed']}" for mode, f in meta.get("failed_modes", {}).items()]
    for mode in (m for m in rows if m.startswith("adaptive")):
        lines += [f"- {mode} {s['time_s']:.2f}s {s['from_plan']} -> {s['to_plan']} ({s['cost_s']:.3f}s): {s['reason']}"
                  for s in rows[mode]["switches_detail"]]
    lines += verdict_lines(verdict)
    path.write_text("\n".join(lines) + "\n")


def _plans_run(rows: dict) -> list[str]:
    """Every plan a mode of this bench ran: the static modes and the layouts the adaptive modes used."""
    used = [p for r in rows.values() for s in r.get("switches_detail", [])
            for p in (s["from_plan"], s["to_plan"]) if p != "none"]
    return list(dict.fromkeys([m for m in rows if not m.startswith("adaptive")] + used))


def plot(path: Path, rows: dict, meta: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    mode_bars(axes, rows, [("wall_throughput_tok_s", "throughput (tok/s, wall)"), ("latency_p50_s", "p50 latency (s)"),
                           ("latency_p99_s", "p99 latency (s)")])
    fig.suptitle(f"{meta['device']} x {meta['world_size']}: {Path(meta['trace']).name}")
    save_figure(fig, path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
