"""Random-weight speed runs from a config-only directory, and the config exporter behind them."""

from __future__ import annotations

import json

import pytest
import torch

from hf_adaptive.evaluation.random_model import WEIGHT_SUFFIXES, export_model_config, load_random_model
from hf_adaptive.evaluation.speed import SpeedEvalConfig, run_speed_eval

# A Llama of SmolLM2's vocabulary (its exported tokenizer stays valid), shrunk so CPU runs take seconds.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}


@pytest.fixture(scope="module")
def config_only_dir(tmp_path_factory):
    """SmolLM2's tokenizer + a tiny Llama config.json exported without weights."""
    out = tmp_path_factory.mktemp("cfg")
    export_model_config(None, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **TINY}))
    return out


def test_export_writes_config_and_tokenizer_but_no_weights(tmp_path):
    """Guards against the exporter copying the checkpoint (too big for the GPU transfer) or dropping the
    tokenizer / chat template the speed prompt needs."""
    from transformers import AutoTokenizer

    from hf_adaptive.models import resolve_model_dir

    names = {p.name for p in export_model_config(None, tmp_path / "cfg")}
    assert "config.json" in names and "tokenizer.json" in names
    assert not [n for n in names if n.endswith(WEIGHT_SUFFIXES)]
    assert sum(p.stat().st_size for p in (tmp_path / "cfg").iterdir()) < 20 * 2**20
    text = "En el principio creó Dios los cielos y la tierra."
    exported, original = AutoTokenizer.from_pretrained(tmp_path / "cfg"), AutoTokenizer.from_pretrained(
        resolve_model_dir(None))
    assert exported(text)["input_ids"] == original(text)["input_ids"]
    with pytest.raises(ValueError, match="own directory"):
        export_model_config(None, resolve_model_dir(None))


def test_random_model_never_reads_weights_and_is_seeded(config_only_dir, tmp_path):
    """Guards against --random-weights loading the checkpoint first (a weights file that is not valid
    safetensors would make that raise) and against unseeded or uninitialised (to_empty) parameters."""
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    for p in config_only_dir.iterdir():
        (poisoned / p.name).write_bytes(p.read_bytes())
    (poisoned / "model.safetensors").write_bytes(b"not a safetensors file")
    model, _ = load_random_model(poisoned, device="cpu", dtype="bfloat16", seed=3)
    again, _ = load_random_model(config_only_dir, device="cpu", dtype="bfloat16", seed=3)
    assert model.config.hidden_size == 64 and model.dtype == torch.bfloat16
    params, params_again = dict(model.named_parameters()), dict(again.named_parameters())
    assert all(torch.equal(params[n], params_again[n]) for n in params)
    q = params["model.layers.0.self_attn.q_proj.weight"].float()
    assert torch.isfinite(q).all() and 0.01 < float(q.detach().std()) < 0.04  # transformers' normal(0, 0.02)
    with pytest.raises(ValueError, match="dtype='int8'.*allowed"):
        load_random_model(config_only_dir, device="cpu", dtype="int8")


def test_speed_eval_random_weights_from_config_only_dir(config_only_dir, tmp_path):
    """Guards against `eval speed --random-weights` needing a checkpoint (the Qwen H100 run ships only
    config + tokenizer) and against the report not saying the weights were random."""
    assert not [p for p in config_only_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)]
    config = SpeedEvalConfig(out_dir=tmp_path / "out", model=str(config_only_dir), random_weights=True,
                             device="cpu", settings=("baseline", "kv4"), batch_sizes=(1, 2), prompt_tokens=24,
                             new_tokens=4, warmup=0, repeats=1)
    result = run_speed_eval(config, progress=False)
    assert [(r["setting"], r["batch_size"]) for r in result["rows"]] == [
        ("baseline", 1), ("kv4", 1), ("baseline", 2), ("kv4", 2)]
    assert all(r["decode_tokens_per_s"] > 0 for r in result["rows"])
    data = json.loads(result["paths"]["json"].read_text())
    assert data["environment"]["weights"] == "random" and "seed 0" in data["environment"]["weights_init"]
    md = result["paths"]["md"].read_text()
    assert "(random weights)" in md and "config.json only" in md
    assert result["paths"]["png"].read_bytes().startswith(b"\x89PNG")


def test_parallel_host_model_with_random_weights_is_the_same_on_every_rank(config_only_dir):
    """Guards the serving worker's ``--random-weights``: every rank builds its own host copy, and the plans shard
    from it, so two builds must be bit-identical (seeded), in the asked dtype, from a dir without weights."""
    from hf_adaptive.parallel.worker import load_host_model

    first, tok = load_host_model(str(config_only_dir), "float32", random_weights=True)
    second, _ = load_host_model(str(config_only_dir), "float32", random_weights=True)
    assert tok is not None and first.dtype == torch.float32
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for v in a.values())  # initialised, not left empty
