"""Report writer: JSON / Markdown / PNG files with provenance, and the Pareto front."""

from __future__ import annotations

import json

from hf_adaptive.evaluation.report import (
    environment_info,
    markdown_table,
    pareto_front,
    plot_bars,
    plot_pareto,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_write_report_round_trips(tmp_path):
    """Guards against results that cannot be read back or lose their provenance (card, versions, commit)."""
    env = environment_info("cpu", "test-card")
    rows = [{"setting": "baseline", "bleu": 30.5, "speedup": 1.0}, {"setting": "kv4", "bleu": 29.0, "speedup": 1.2}]
    paths = write_report(tmp_path / "out", "bleu", {"summary": rows}, env, markdown_table(rows), "title")
    data = json.loads(paths["json"].read_text())
    assert data["summary"] == rows
    for key in ("card", "torch", "transformers", "git_commit", "command"):
        assert key in data["environment"]
    assert data["environment"]["card"] == "test-card"
    md = paths["md"].read_text()
    assert md.startswith("# title") and "| kv4 | 29 | 1.2 |" in md and "test-card" in md


def test_plots_are_pngs(tmp_path):
    """Guards against plot code writing nothing (or not a PNG) under the headless Agg backend."""
    p1 = plot_pareto(tmp_path / "p.png", ["baseline", "kv8", "kv4"], [1.0, 1.1, 1.3], [30, 29.5, 25], "t")
    p2 = plot_bars(tmp_path / "b.png", ["baseline", "kv4"], [100.0, 120.0], "t", "tok/s")
    for path in (p1, p2):
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_pareto_front():
    """Guards against dominated settings (slower AND worse) being drawn on the front."""
    points = [(1.0, 30.0), (1.2, 29.0), (1.1, 28.0), (1.5, 20.0), (0.9, 30.0)]
    assert pareto_front(points) == [0, 1, 3]


def test_markdown_table_empty():
    """Guards against a crash when a run produced no rows."""
    assert "no rows" in markdown_table([])


def test_short_label():
    """Guards against long setting specs squeezing the plot area (labels must stay short)."""
    from hf_adaptive.evaluation.report import short_label

    assert short_label("kv:bits=4,residual_length=16,block_size=16") == "kv4 r16 b16"
    assert short_label("precision:high=0.9,low=0.6") == "prec h0.9 l0.6"


def test_git_commit_names_this_checkout_and_no_other_repository(tmp_path):
    """Guards against an installed copy whose site-packages lies inside another repository recording that
    repository's commit as the provenance of a result."""
    import importlib.util
    import re
    import shutil
    import subprocess

    from hf_adaptive.evaluation.report import git_commit

    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", git_commit())
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "t"],
                   cwd=tmp_path, check=True)
    site = tmp_path / "venv" / "site-packages" / "hf_adaptive" / "evaluation"
    site.mkdir(parents=True)
    shutil.copy(importlib.util.find_spec("hf_adaptive.evaluation.report").origin, site / "report.py")
    spec = importlib.util.spec_from_file_location("installed_report", site / "report.py")
    installed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(installed)
    assert installed.git_commit() == "unknown"
