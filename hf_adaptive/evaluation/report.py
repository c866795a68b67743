"""Result writer: JSON + Markdown + PNG under a results directory, with the run's provenance.

Contract: ``environment_info(device)`` records what produced the numbers (card, torch / transformers /
triton versions, git commit, command line, time): the one environment card every result carries, read back by
``eval/index_results.py``; ``write_report(out_dir, name, payload, table, plots)``
writes ``<name>.json`` (the payload plus ``environment``), ``<name>.md`` (a title, the environment and
a Markdown table of ``table`` rows) and any PNGs. ``pareto_front`` is pure; the plots use Agg.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def git_commit(repo_dir: Path | None = None) -> str:
    """``HEAD``'s hash (with ``+dirty`` when the tree has changes), or ``"unknown"`` outside git.

    Without ``repo_dir``: the checkout this package runs from, and ``"unknown"`` for an installed copy (its
    site-packages may sit inside another project's repository, whose commit would be a false provenance).
    ``$HF_ADAPTIVE_GIT_COMMIT``, when set, wins: a tree copied to another machine (a lent GPU host) may carry a
    stale ``.git``, so the caller names the commit it copied.
    """
    if os.environ.get("HF_ADAPTIVE_GIT_COMMIT"):
        return os.environ["HF_ADAPTIVE_GIT_COMMIT"]
    cwd = repo_dir or Path(__file__).resolve().parents[2]
    if repo_dir is None and not (cwd / "pyproject.toml").is_file():
        return "unknown"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def device_description(device: Any) -> str:
    """The accelerator's name (e.g. 'NVIDIA H100 80GB HBM3') or the CPU's, with its torch thread count."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment_info(device: str = "cpu", card: str | None = None) -> dict[str, Any]:
    """Provenance of a result: card (``device_description`` unless given), versions, git commit, command, time."""
    import torch
    import transformers

    return {"card": card or device_description(device), "device": device, "torch": torch.__version__,
            "transformers": transformers.__version__, "triton": _triton_version(), "cuda": torch.version.cuda,
            "python": platform.python_version(), "platform": platform.platform(),
            "git_commit": git_commit(), "command": " ".join(sys.argv),
            "utc_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (columns default to the first row's keys)."""
    if not rows:
        return "_(no rows)_\n"
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown_report(title: str, environment: Mapping[str, Any], table: str, notes: str = "") -> str:
    """The Markdown page: title, provenance list, the table, then free notes."""
    env = "\n".join(f"- **{k}**: `{v}`" for k, v in environment.items())
    return f"# {title}\n\n{env}\n\n{table}\n{notes}\n"


def write_report(out_dir: str | Path, name: str, payload: Mapping[str, Any], environment: Mapping[str, Any],
                 table: str, title: str, notes: str = "") -> dict[str, Path]:
    """Write ``<name>.json`` and ``<name>.md`` under ``out_dir`` (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    data = {"environment": dict(environment), **payload}
    paths["json"].write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n",
                             encoding="utf-8")
    paths["md"].write_text(markdown_report(title, environment, table, notes), encoding="utf-8")
    return paths


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when both coordinates are better larger (e.g. speedup, BLEU)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points)
                        if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


_LABEL_ABBREVIATIONS = (("kv:bits=", "kv"), (",residual_length=", " r"), (",block_size=", " b"),
                        ("kv:memory_budget=", "kv@"), ("precision:", "prec "), ("high=", "h"), (",low=", " l"))


def short_label(spec: str) -> str:
    """A plot label for a setting spec: ``kv:bits=4,residual_length=16`` -> ``kv4 r16``."""
    for long, short in _LABEL_ABBREVIATIONS:
        spec = spec.replace(long, short)
    return spec


def headless_pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed): the one place results' plots pick it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Lay ``fig`` out, write it to ``path`` as a PNG and free it (a script that plots in a loop keeps no figures)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    headless_pyplot().close(fig)
    return Path(path)


def plot_pareto(path: str | Path, labels: Sequence[str], speedups: Sequence[float], scores: Sequence[float],
                title: str, y_label: str = "BLEU",
                x_label: str = "speedup vs baseline (x, higher is faster)", show_front: bool = True) -> Path:
    """Scatter of score vs speedup, labelled, with the Pareto front drawn (unless ``show_front`` is
    False, e.g. when the x values are timing noise); saved as a PNG."""
    plt = headless_pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(speedups, scores, zorder=3)
    for label, x, y in zip(labels, speedups, scores):
        ax.annotate(short_label(label), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if show_front:
        front = pareto_front(list(zip(speedups, scores)))
        ax.plot([speedups[i] for i in front], [scores[i] for i in front], "--", color="tab:red",
                label="Pareto front", zorder=2)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if show_front:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_bars(path: str | Path, labels: Sequence[str], values: Sequence[float], title: str,
              y_label: str) -> Path:
    """A labelled bar chart (e.g. decode tokens/s per setting) saved as a PNG."""
    plt = headless_pyplot()

    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(labels) + 2), 4))
    bars = ax.bar(range(len(values)), values)
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_xticks(range(len(labels)), [short_label(x) for x in labels], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)
