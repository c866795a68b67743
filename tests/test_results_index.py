"""The results index (eval/results/README.md) and the result folders agree, and the index is what the script makes.

The generator is a script, not part of the package, so it is loaded from its file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import load_eval_script

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "eval" / "results"
ix = load_eval_script("index_results")


@pytest.fixture(scope="module")
def index_text() -> str:
    return (RESULTS / "README.md").read_text(encoding="utf-8")


def test_committed_index_and_readme_table_equal_a_fresh_generation():
    """Guards a result added, moved or removed without re-running `python eval/index_results.py`."""
    for path, text in ix.generate().items():
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run python eval/index_results.py"


def test_every_result_folder_is_listed(index_text):
    """Guards a folder that no index row points to (a result nobody can find)."""
    folders = [p.name for p in RESULTS.iterdir() if p.is_dir() and p.name[0] not in "._"]
    assert folders
    missing = [f for f in folders if f"]({f}/" not in index_text]
    assert not missing, f"folders absent from the index: {missing}"


def test_nothing_listed_is_missing(index_text):
    """Guards an index link to a folder that has left the tree (withdrawn entries name a commit, not a link)."""
    links = re.findall(r"\]\(([^)]+)\)", index_text)
    assert links
    absent = [link for link in links if not (RESULTS / link).is_dir()]
    assert not absent, f"index links with no folder: {absent}"


def test_folder_names_carry_no_history():
    """Guards per-day folder names (a run-date suffix such as `_s6`): a folder says what and where, never when."""
    history = re.compile(r"(^|_)(s\d+|session\d*|wave\d*|call\d+|rerun)(_|$)", re.IGNORECASE)
    bad = [p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*") if p.is_dir() and history.search(p.name)]
    assert not bad, f"folder names with history in them: {bad}"


def test_every_headline_names_a_stage_of_run_sh():
    """Guards a headline whose stage eval/gpu/run.sh does not have (nobody could regenerate it)."""
    script = (REPO / "eval" / "gpu" / "run.sh").read_text(encoding="utf-8")
    _, heads, _ = ix.collect()
    assert heads
    for head in heads:
        assert f"job_{head.run.stage}_" in script, f"{head.file}: stage {head.run.stage} is not in eval/gpu/run.sh"


def test_resolve_reads_paths_and_refuses_ambiguous_selectors():
    """Guards a headline number read from the wrong row: a selector must match exactly one element."""
    data = {"rows": [{"cache": "a", "ms": 1.5}, {"cache": "b", "ms": 2.0}, {"cache": "b", "ms": 3.0}],
            "x/y": {"ok": True}}
    assert ix.resolve(data, "rows[cache=a]/ms") == 1.5
    assert ix.resolve(data, "rows[1]/ms") == 2.0
    assert ix.resolve(data, "x~1y/ok") is True
    with pytest.raises(KeyError, match="matches 2 elements"):
        ix.resolve(data, "rows[cache=b]/ms")
    with pytest.raises(ValueError, match="headlines.json"):
        ix.render_number("{rows[cache=c]/ms:.1f}", data, "somewhere.json")
    assert ix.render_number("{rows[cache=a]/ms:.2f} ms, {x~1y/ok:met/not met}", data, "f") == "1.50 ms, met"


def test_a_new_folder_with_card_versions_command_is_picked_up_without_edits(tmp_path):
    """Guards the contract new benchmarks rely on: a JSON carrying card, versions and command (and optionally its
    own headline list) is indexed under its area and stage with no change to the generator or headlines.json."""
    folder = tmp_path / "kv_generate_h200"
    folder.mkdir()
    result = {"card": "NVIDIA H200", "versions": {"torch": "2.11.0", "transformers": "5.17.0"},
              "command": "python eval/bench_generate.py --out eval/results/kv_generate_h200",
              "rows": [{"cache": "adaptive", "tok_s": 812.25}],
              "headline": [{"what": "generate", "number": "{rows[cache=adaptive]/tok_s:.0f} tok/s"}]}
    (folder / "generate.json").write_text(json.dumps(result), encoding="utf-8")
    folders, heads, withdrawn = ix.collect(tmp_path)
    assert [r.path for r in folders["kv_generate_h200"]] == ["kv_generate_h200"]
    run = folders["kv_generate_h200"][0]
    assert (run.card, run.versions, run.stage) == ("NVIDIA H200", "torch 2.11.0, transformers 5.17.0", "kv")
    assert [(h.area, h.number) for h in heads] == [("kv", "812 tok/s")]
    page = ix.render_index(folders, heads, withdrawn)
    assert "[`kv_generate_h200/`](kv_generate_h200/)" in page and "812 tok/s" in page


def test_misnamed_or_empty_folders_are_refused(tmp_path):
    """Guards a result dropped into the tree without an area prefix or without provenance."""
    (tmp_path / "bench_misc").mkdir()
    (tmp_path / "bench_misc" / "r.json").write_text('{"command": "x"}', encoding="utf-8")
    with pytest.raises(ValueError, match="<area>_<what>_<card>"):
        ix.collect(tmp_path)
    (tmp_path / "bench_misc" / "r.json").unlink()
    (tmp_path / "bench_misc").rmdir()
    (tmp_path / "kv_empty_h100").mkdir()
    with pytest.raises(ValueError, match="holds no JSON with a command"):
        ix.collect(tmp_path)


def test_readme_table_has_at_most_eight_rows():
    """Guards the README's headline table growing back into a wall of numbers."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index(ix.README_BEGIN):readme.index(ix.README_END)]
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    assert 1 <= len(rows) <= ix.README_MAX_ROWS


def test_a_headline_names_its_own_files_command_not_its_folders_first(tmp_path):
    """Guards provenance: where one folder holds several results, a headline on the second names the command and
    card of that result's JSON, not those of the folder's first (alphabetical) JSON."""
    folder = tmp_path / "precision_generate_h100"
    folder.mkdir()
    for name, cmd, card in (("a.json", "eval/bench_a.py --x", "H100"), ("b.json", "eval/bench_b.py --y", "H200")):
        (folder / name).write_text(json.dumps({"environment": {"command": cmd, "card": card, "torch": "2"},
                                               "rows": [{"ms": 1.0}]}))
    (tmp_path / "headlines.json").write_text(json.dumps({"headlines": [
        {"folder": folder.name, "file": "b.json", "what": "b", "number": "{rows[0]/ms:.1f}"}], "withdrawn": []}))
    _, heads, _ = ix.collect(tmp_path)
    (head,) = heads
    assert head.run.command == "eval/bench_b.py --y" and head.run.card == "H200"
