"""`hf-adaptive generate`: the README's main job, on the embedded model, offline."""

import json

import pytest

from hf_adaptive.cli import main
from hf_adaptive.commands.generate import bits_timeline


def test_bits_timeline_runs():
    """Guards against the report's precision timeline merging or dropping rungs."""
    history = [{"step": i, "bits": b} for i, b in enumerate([16, 16, 8, 8, 4, 8])]
    assert bits_timeline(history) == [(0, 1, 16), (2, 3, 8), (4, 4, 4), (5, 5, 8)]


@pytest.mark.slow
def test_generate_under_budget_reports_and_steps_down(tmp_path, capsys):
    """Guards against the CLI ignoring --memory-budget or printing a report that disagrees with the cache."""
    out = tmp_path / "report.json"
    rc = main(["generate", "Count from 1 to 200, separated by commas.", "--memory-budget", "6MiB", "--max-new-tokens", "120",
               "--device", "cpu", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "--- hf-adaptive report ---" in printed and "tokens/s" in printed
    data = json.loads(out.read_text())
    bits = {b for _, _, b in data["report"]["timeline"]}
    assert bits & {8, 4}, f"the budget never forced a lower rung: {data['report']['timeline']}"
    assert data["stats"]["kv_bytes"] == data["report"]["kv_bytes"]
    assert data["report"]["new_tokens"] > 0
