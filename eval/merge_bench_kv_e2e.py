"""Merge several ``bench_kv_e2e.py`` runs (same card) into one report and plot, each row tagged with its run.

    python eval/merge_bench_kv_e2e.py --out eval/results/kv_e2e_h100 \
        cudnn_on=RUN_A/bench_kv_e2e.json main=RUN_B/bench_kv_e2e.json rerun=RUN_C/bench_kv_e2e.json

Rows keep their numbers; the cache label becomes ``cache@tag`` when a cache appears in more than one run, so a
configuration measured twice (e.g. StaticCache with and without cuDNN SDPA) shows as two lines. Each run's
command, time and git commit are listed. Ratios between rows of different runs are cross-run ratios: the
Markdown says which run each number came from.

``--one-run-per-shape``: for each (context, batch) keep the rows of the one run that measured the most caches
there (the later run on a tie), so every ratio within a shape is a same-run ratio and each cache is one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import E2E_SERIES, plot_by_context

from hf_adaptive.evaluation.report import markdown_table


def merge(sources: dict[str, Path]) -> tuple[list[dict], dict[str, dict]]:
    """Rows of every run tagged with ``run``; environments by tag."""
    rows, envs = [], {}
    for tag, path in sources.items():
        data = json.loads(Path(path).read_text())
        envs[tag] = data["environment"]
        rows += [{**r, "run": tag} for r in data["rows"]]
    seen: dict[str, set] = {}
    for r in rows:
        seen.setdefault(r["cache"], set()).add(r["run"])
    for r in rows:
        r["label"] = r["cache"] if len(seen[r["cache"]]) == 1 else f"{r['cache']}@{r['run']}"
    return rows, envs


def one_run_per_shape(rows: list[dict]) -> list[dict]:
    """Rows of the run with the most measured caches per (context, batch); later runs win ties."""
    order = list(dict.fromkeys(r["run"] for r in rows))
    best: dict[tuple, str] = {}
    for shape in dict.fromkeys((r["context"], r["batch"]) for r in rows):
        counts = {run: sum(1 for r in rows if (r["context"], r["batch"]) == shape and r["run"] == run
                          and "skipped" not in r) for run in order}
        best[shape] = max(reversed(order), key=lambda run: counts[run])
    kept = [r for r in rows if r["run"] == best[(r["context"], r["batch"])]]
    for r in kept:
        r["label"] = r["cache"]
    return kept


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="End-to-end decode, random-init Llama-3.2-1B shape, bf16")
    p.add_argument("--notes", default="", help="extra Markdown appended to the report")
    p.add_argument("--one-run-per-shape", action="store_true",
                   help="per (context, batch) keep only the run that measured the most caches")
    p.add_argument("runs", nargs="+", help="TAG=path/to/bench_kv_e2e.json")
    args = p.parse_args(argv)
    sources = dict(arg.split("=", 1) for arg in args.runs)
    rows, envs = merge(sources)
    if args.one_run_per_shape:
        rows = one_run_per_shape(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_kv_e2e.json").write_text(json.dumps({"runs": envs, "rows": rows}, indent=1, default=str))
    card = next(iter(envs.values()))["card"]
    plot_by_context(out / "bench_kv_e2e.png", [{**r, "cache": r["label"]} for r in rows], f"{args.title} on {card}",
                    E2E_SERIES)
    lines = [f"# {args.title} on {card}", "", "## Runs", ""]
    for tag, env in envs.items():
        lines.append(f"- **{tag}**: `{env.get('command')}` at {env.get('utc_time')} (torch {env.get('torch')}, "
                     f"transformers {env.get('transformers')}, warm-up {env.get('warmup')}, repeats {env.get('repeats')}, "
                     f"commit {env.get('git_commit')})")
    lines += ["", markdown_table(rows, ["run", "cache", "context", "batch", "ms_per_token", "gpu_ms_per_token", "kv_gib",
                                        "view_changes", "cudnn_sdpa", "skipped"]), "", args.notes]
    (out / "bench_kv_e2e.md").write_text("\n".join(lines) + "\n")
    print((out / "bench_kv_e2e.md").read_text())


if __name__ == "__main__":
    main()
