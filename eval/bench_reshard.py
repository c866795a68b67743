"""Switch cost: how long the engine takes to re-shard between plans, from a pageable and from a page-locked host copy.

Run one process per device, e.g. on 4 GPUs with the Qwen2.5-7B shape (random weights):
    python -m hf_adaptive.parallel.run_script --processes 4 eval/bench_reshard.py --model .gpu/qwen7b_cfg --random-weights \
        --out runs/reshard

One engine, one host copy. It first cycles through every valid plan with the host copy pageable, then page-locks it
(``Engine.pin``, timed), then cycles again. Each switch is timed to the point where every rank holds its new shard
on the device (``Engine.reshard``: copies synchronised, then a barrier); a row is the slowest rank. Each plan's
logits for a fixed prompt must be bitwise identical from both host copies (same weights, same kernels), or the
run fails. Writes ``reshard.json``, ``reshard.md`` and ``reshard.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import environment, pyplot, save_figure  # first: sets the offline default
import torch
import torch.distributed as dist
from tqdm import tqdm

from hf_adaptive.evaluation.report import device_description

from hf_adaptive.parallel.engine import Engine
from hf_adaptive.parallel.plans import ModelDims, all_plans
from hf_adaptive.parallel.policy_args import add_host_model_arguments
from hf_adaptive.parallel.worker import init_distributed, load_host_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_host_model_arguments(p)
    p.add_argument("--rounds", type=int, default=2, help="cycles through every plan per host-copy mode")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def cycle(engine: Engine, plans: list, rounds: int, mode: str, prompt: tuple, logits: dict) -> list[dict]:
    """Re-shard through ``plans`` ``rounds`` times; one row per switch (the slowest rank's seconds)."""
    rows = []
    order = [p for _ in range(rounds) for p in plans] + [plans[0]]
    bar = tqdm(order, desc=f"{mode} switches", disable=engine.rank != 0)
    for plan in bar:
        before = engine.plan
        seconds = engine.reshard(plan)
        worst = [None] * engine.world_size
        dist.all_gather_object(worst, (seconds, engine.shard.param_bytes()))
        if before is not None and before.name != plan.name:  # the first build of a cycle may rebuild the last plan
            rows.append({"mode": mode, "from": before.name, "to": plan.name, "seconds": max(s for s, _ in worst),
                         "bytes_per_device": max(b for _, b in worst)})
        if plan.name not in logits.setdefault(mode, {}):
            out = engine.forward_logits(*prompt)
            logits[mode][plan.name] = None if out is None else out.float().cpu()
    return rows


def main() -> int:
    args = parse_args()
    rank, world, device = init_distributed()
    model, _ = load_host_model(args.model, args.dtype, args.random_weights, device)
    plans = all_plans(world, ModelDims.from_config(model.config))
    if not plans:
        raise SystemExit(f"no valid plan for {world} processes; launch it with --processes >= 2 "
                         "(python -m hf_adaptive.parallel.run_script)")
    engine = Engine(model, rank, world, device, plans, pin_host=False)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    prompt = (ids, torch.ones_like(ids))
    logits: dict = {}
    rows = cycle(engine, plans, args.rounds, "pageable", prompt, logits)
    pin_s = [None] * world
    dist.all_gather_object(pin_s, engine.pin() if device.type == "cuda" else 0.0)
    same = None  # on the CPU there is nothing to page-lock, so nothing to compare
    if device.type == "cuda":
        rows += cycle(engine, plans, args.rounds, "page-locked", prompt, logits)
        same = all(a is None or torch.equal(a, logits["page-locked"][name]) for name, a in logits["pageable"].items())
    flag = torch.tensor([int(same is not False)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if rank == 0:
        meta = {**environment(str(device)), "world_size": world, "device": device_description(device),
                "model": args.model, "random_weights": args.random_weights, "dtype": args.dtype,
                "pin_seconds": max(pin_s), "pinned_bytes_per_rank": engine.pinned_bytes,
                "logits_identical_both_modes": None if same is None else bool(flag.item())}
        write(Path(args.out), meta, rows)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if flag.item() else 1


def summarise(rows: list[dict]) -> list[dict]:
    """Per (from, to): mean seconds in each mode, the page-locked speed-up, and the copy rate it reached."""
    out: dict[tuple[str, str], dict] = {}
    for r in (r for r in rows if r["from"] != r["to"]):  # a rebuild of the same plan is not a switch
        entry = out.setdefault((r["from"], r["to"]), {"from": r["from"], "to": r["to"],
                                                     "bytes_per_device": r["bytes_per_device"]})
        entry.setdefault(r["mode"], []).append(r["seconds"])
    for entry in out.values():
        for mode in ("pageable", "page-locked"):
            if mode in entry:
                entry[f"{mode}_s"] = sum(entry[mode]) / len(entry[mode])
        if "pageable_s" in entry and "page-locked_s" in entry:
            entry["speedup"] = entry["pageable_s"] / entry["page-locked_s"]
            entry["page-locked_GBps"] = entry["bytes_per_device"] / entry["page-locked_s"] / 1e9
    return list(out.values())


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    identical = meta["logits_identical_both_modes"]
    (out / "reshard.json").write_text(json.dumps({"meta": meta, "switches": rows, "summary": summary}, indent=1))
    lines = [f"# Re-shard cost ({meta['device']} x {meta['world_size']})", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, model `{meta['model']}` {meta['dtype']}"
             f"{' (random weights)' if meta['random_weights'] else ''}", "", f"Command: `{meta['command']}`", "",
             f"Page-locking the host copy: {meta['pin_seconds']:.1f} s, {meta['pinned_bytes_per_rank'] / 2**30:.2f} "
             f"GiB per rank. Logits identical from both host copies on every plan: "
             f"**{'not checked (CPU)' if identical is None else identical}**.",
             "",
             "Seconds per switch (mean over rounds, slowest rank); bytes: the new shard's weights per device. The rate "
             "is those bytes over the page-locked time; a TP shard moves its row-parallel matrices whole and cuts them "
             "on the device, so more than that crosses the link.", "",
             "| from | to | GiB per device | pageable s | page-locked s | speed-up | shard GB/s, page-locked |",
             "|---|---|---|---|---|---|---|"]
    for e in summary:
        lines.append(f"| {e['from']} | {e['to']} | {e['bytes_per_device'] / 2**30:.2f} | "
                     f"{e.get('pageable_s', 0):.3f} | "
                     f"{e.get('page-locked_s', float('nan')):.3f} | {e.get('speedup', float('nan')):.2f}x | "
                     f"{e.get('page-locked_GBps', float('nan')):.1f} |")
    (out / "reshard.md").write_text("\n".join(lines) + "\n")
    plot(out / "reshard.png", summary, meta)
    print("\n".join(lines))


def plot(path: Path, summary: list[dict], meta: dict) -> None:
    plt = pyplot()
    labels = [f"{e['from']}→{e['to']}" for e in summary]
    x = range(len(summary))
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(summary)), 3.6))
    ax.bar([i - 0.2 for i in x], [e.get("pageable_s", 0) for e in summary], 0.4, label="pageable host copy")
    ax.bar([i + 0.2 for i in x], [e.get("page-locked_s", 0) for e in summary], 0.4, label="page-locked host copy")
    ax.set_xticks(list(x), labels, rotation=30)
    ax.set_ylabel("seconds per switch")
    ax.set_title(f"Re-shard cost, {Path(meta['model']).name} on {meta['device']} x {meta['world_size']}")
    ax.legend()
    save_figure(fig, path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
