"""Fit a simulator calibration from the batch records of real serving runs (no extra GPU time).

    python eval/calibrate_from_serve.py eval/results/parallel_serve_equal_concurrency_qwen7b/h200x4_cost_rule \
        --model .gpu/qwen7b_cfg --device-memory-gb 18 --out eval/calibration/parallel_h200x4_qwen7b_served_per_device.json

Every ``<mode>.json`` of the given ``parallel_serve_bench.py`` output directories (static and adaptive runs alike)
records each request's batch (plan, start, finish) and size, so each batch's duration is known together with the
rows, padded prompt width and new tokens of its busiest replica (re-routed with ``requests.route``, as at run time).
Per plan, the five latency coefficients of ``PlanCost`` are fitted to those durations by least squares (negative
ones dropped and the rest refitted). The first ``--warm-batches`` (3) batches after each layout change, start-up
included, are left out of that fit: they run slower on the GPUs (2-4x for the first two). Their median excess over the
fit, per position and pooled over plans, becomes ``warm_batch_extra_ms``, which the simulator adds after every
switch.
Memory comes from the model config: weights on the busiest device of each plan and ``capacity.ReplicaMemory``.
The switch cost is the mean of the adaptive runs' measured switches.

The fit only covers the batch shapes the runs served (here: 8-16 chats of 100-300 tokens, and 1-4 documents of
~12k tokens); outside them it extrapolates. The Markdown report lists every batch with its fitted time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from hf_adaptive.parallel.calibration_fit import batches_of, fit_latency, fit_warm_extra, weights_per_device
from hf_adaptive.parallel.capacity import ReplicaMemory
from hf_adaptive.parallel.cost_model import PlanCost
from hf_adaptive.parallel.plans import ModelDims, ParallelPlan


def used_in_fit(batch: dict, warm_batches: int) -> str:
    """The report's last column: whether the batch entered the latency fit, and why not."""
    k = batch["since_switch"]
    return "yes" if k >= warm_batches else f"no (batch {k + 1} of the layout: warm_batch_extra_ms)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", help="parallel_serve_bench.py --out directories of one machine")
    p.add_argument("--model", required=True, help="the checkpoint or config dir the runs served")
    p.add_argument("--dtype-bytes", type=int, default=2)
    p.add_argument("--device-memory-gb", type=float, required=True, help="the runs' --device-memory-gb")
    p.add_argument("--memory-headroom", type=float, default=0.15, help="the runs' --memory-headroom")
    p.add_argument("--warm-batches", type=int, default=3,
                   help="the first N batches after each layout change (start-up included) are left out of the "
                        "latency fit; their median excess over it, per position, becomes warm_batch_extra_ms")
    p.add_argument("--out", required=True, help="calibration JSON path (a .md report is written beside it)")
    args = p.parse_args()
    if args.warm_batches < 0:
        p.error(f"--warm-batches must be >= 0, got {args.warm_batches}")
    from transformers import AutoConfig

    from hf_adaptive.models import resolve_model_dir

    config = AutoConfig.from_pretrained(resolve_model_dir(args.model))
    by_plan: dict[str, list[dict]] = defaultdict(list)
    switches, metas = [], []
    for run_dir in args.run_dirs:
        bench = json.loads((Path(run_dir) / "serve_bench.json").read_text())
        for mode in bench["runs"]:
            run = json.loads((Path(run_dir) / f"{mode}.json").read_text())
            metas.append({"dir": run_dir, "mode": mode, "device": run["meta"]["device"],
                          "world_size": run["meta"]["world_size"]})
            switches += [s["cost_s"] for s in run["switches"]]
            for b in batches_of(run):
                by_plan[b["plan"]].append(b | {"run": f"{Path(run_dir).name}/{mode}"})
    worlds = {m["world_size"] for m in metas}
    if len(worlds) != 1:
        raise SystemExit(f"run_dirs mix world sizes {sorted(worlds)}; calibrate one machine size at a time")
    plans = {}
    for name, batches in sorted(by_plan.items()):
        plan = ParallelPlan.parse(name)
        used = [b for b in batches if b["since_switch"] >= args.warm_batches]
        if not used:
            raise SystemExit(f"plan {name}: no batch after the first {args.warm_batches} of a layout to fit; "
                             f"lower --warm-batches or add runs")
        latency = fit_latency(used)
        memory = ReplicaMemory.for_plan(config, plan, args.dtype_bytes)
        plans[name] = PlanCost(**latency, weights_bytes_per_device=weights_per_device(config, plan, args.dtype_bytes),
                               kv_bytes_per_token_per_device=memory.kv_bytes_per_token,
                               prefill_bytes_per_token_per_device=memory.prefill_bytes_per_token,
                               mask_bytes_per_token_squared=memory.mask_bytes)
        for b in batches:
            b["fitted_s"] = plans[name].batch_ms(b["rows"], b["width"], b["new"]) / 1e3
    every = [b for batches in by_plan.values() for b in batches]
    warm_extra = fit_warm_extra(every, [b["fitted_s"] for b in every], args.warm_batches)
    calib = {"world_size": worlds.pop(), "device_memory_bytes": args.device_memory_gb * 2**30,
             "memory_headroom": args.memory_headroom, "warm_batch_extra_ms": warm_extra,
             "switch_cost_ms": 1e3 * float(np.mean(switches)) if switches else 0.0,
             "plans": {k: vars(v) for k, v in plans.items()},
             "meta": {"measured_on": f"serving runs on {metas[0]['device']} (batch records, not a calibration grid)",
                      "device": metas[0]["device"], "runs": metas, "model": args.model,
                      "dims": vars(ModelDims.from_config(config)),
                      "command": " ".join(["python"] + sys.argv), "switch_costs_s": switches}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(calib, indent=1))
    lines = [f"# Calibration fitted from serving runs: `{out.name}`", "", f"Command: `{calib['meta']['command']}`", "",
             f"Switch cost: mean {calib['switch_cost_ms']:.0f} ms of {len(switches)} measured switches.", "",
             f"First batches after a layout change (start-up included), median extra over the fit by position: "
             f"{', '.join(f'{x / 1e3:.2f} s' for x in warm_extra) or 'none'} (`--warm-batches {args.warm_batches}`).", "",
             "| plan | run | rows | width | new | measured s | fitted s | used in fit |", "|---|---|---|---|---|---|---|---|"]
    for name, batches in sorted(by_plan.items()):
        lines += [f"| {name} | {b['run']} | {b['rows']} | {b['width']} | {b['new']} | {b['seconds']:.2f} | "
                  f"{b['fitted_s']:.2f} | {used_in_fit(b, args.warm_batches)} |" for b in batches]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:6]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
