"""`--model DIR`: the generating subcommands run a local checkpoint directory, offline, in every mode."""

from __future__ import annotations

import json
import os

import pytest

from hf_adaptive.cli import main
from hf_adaptive.evaluation.random_model import export_model_config, load_random_model

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved 2-layer Llama with the embedded model's tokenizer (random weights: fast, not fluent)."""
    out = tmp_path_factory.mktemp("local_ckpt")
    export_model_config(None, out, overrides=TINY)
    model, _ = load_random_model(out, device="cpu", dtype="float32")
    model.save_pretrained(out)
    return out


def test_generate_runs_a_local_directory_and_stays_offline(checkpoint, tmp_path, monkeypatch):
    """Guards against a directory spec being sent to the Hub (only an org/name id may go online)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    report = tmp_path / "r.json"
    assert main(["generate", "hi", "--model", str(checkpoint), "--max-new-tokens", "4", "--device", "cpu",
                 "--json", str(report)]) == 0
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert json.loads(report.read_text())["report"]["new_tokens"] == 4


@pytest.mark.parametrize("mode", ["lossy", "graph", "verified", "cascade"])
def test_precision_runs_a_local_directory_in_every_mode(checkpoint, tmp_path, mode):
    report = tmp_path / "t.json"
    assert main(["precision", "hi", "--model", str(checkpoint), "--mode", mode, "--max-new-tokens", "5",
                 "--max-draft", "2", "--device", "cpu", "--json", str(report)]) == 0
    written = json.loads(report.read_text())
    assert (written["emitted_tokens"] if mode == "cascade" else written["steps"]) > 0
