"""Settings registry, speed measurement and the translation runner (tiny model; SmolLM2 where text is needed)."""

from __future__ import annotations

import pytest
import torch

from hf_adaptive.evaluation.settings import build_setting, order_specs, parse_spec, spec_groups
from hf_adaptive.evaluation.timing import SpeedConfig, measure_interleaved, measure_speed, percentile, summarize_run
from helpers import make_tiny_model


def test_parse_spec_aliases_and_params():
    """Guards against aliases losing user parameters or params being parsed into the wrong keys."""
    assert parse_spec("kv4") == ("kv", {"bits": "4"})
    assert parse_spec("kv4:residual_length=16") == ("kv", {"bits": "4", "residual_length": "16"})
    assert parse_spec("precision:high=0.8,low=0.5") == ("precision", {"high": "0.8", "low": "0.5"})
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("kv:bits")


def test_order_specs_baseline_first_precision_last():
    """Guards against an in-place precision setting running before settings that need the exact model."""
    assert order_specs(["kv4", "precision:high=0.8", "baseline", "kv8", "kv4"]) == [
        "baseline", "kv4", "kv8", "precision:high=0.8"]


def test_build_setting_errors_name_the_fix():
    """Guards against typos in --settings silently running the wrong configuration."""
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="unknown setting 'kv5'.*allowed"):
        build_setting("kv5", model)
    with pytest.raises(ValueError, match="unknown parameter"):
        build_setting("kv:bits=4,bitz=2", model)
    with pytest.raises(ValueError, match="needs bits"):
        build_setting("kv", model)


def test_summarize_run_and_percentile():
    """Guards against TTFT/latency mix-ups: TTFT is start->first stamp, tokens/s counts batch x intervals."""
    run = summarize_run(10.0, [10.5, 10.6, 10.7, 11.0], batch_size=2)
    assert run["ttft_ms"] == pytest.approx(500.0)
    assert run["decode_tokens_per_s"] == pytest.approx(2 * 3 / 0.5)
    assert run["p50_token_ms"] == pytest.approx(100.0)
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.99) == pytest.approx(3.97)
    with pytest.raises(ValueError, match="stamps"):
        summarize_run(0.0, [1.0], 1)


def test_measure_speed_counts_every_step_and_records_kv():
    """Guards against timing the wrong number of steps (EOS stopping early), losing the KV cache stats, and
    interleaved repeats being attributed to the wrong setting."""
    model = make_tiny_model("llama")
    ids = torch.randint(1, 128, (2, 24))
    config = SpeedConfig(batch_size=2, prompt_tokens=24, new_tokens=12, warmup=1, repeats=2)
    settings = [build_setting("baseline", model), build_setting("kv:bits=4,residual_length=8,block_size=8", model)]
    base, kv = measure_interleaved(model, ids, settings, config)
    assert base["setting"] == "baseline" and kv["setting"].startswith("kv:bits=4")
    assert len(base["runs"]) == 2 and base["decode_tokens_per_s"] > 0 and base["runs"][0]["stats"] == {}
    assert base["ttft_ms"] > 0 and base["p99_token_ms"] >= base["p50_token_ms"] > 0
    assert kv["runs"][0]["stats"]["bits"] == 4 and kv["runs"][0]["stats"]["kv_bytes"] > 0
    assert kv["peak_memory_bytes"] > 0
    single = measure_speed(model, ids, settings[0], SpeedConfig(2, 24, 12, 0, 1))
    assert len(single["runs"]) == 1


def test_spec_groups_keep_in_place_settings_apart():
    """Guards against building the precision setting (which swaps the model's linears) before the baseline runs."""
    assert spec_groups(["precision", "kv4", "baseline"]) == [["baseline", "kv4"], ["precision"]]
    assert spec_groups(["baseline"]) == [["baseline"]]


@pytest.mark.slow
def test_translate_is_batch_invariant_and_kv_settings_run(smollm2):
    """Guards against wrong padding side / pad handling: a verse must translate the same alone and batched
    with a longer one; and the KV settings must produce output for every verse, in source order."""
    from hf_adaptive.evaluation.translate import TranslationConfig, translate

    model, tok = smollm2
    short, long = "Jesús lloró.", "Y Judas engendró de Thamar á Phares y á Zara: y Phares engendró á Esrom:"
    config = TranslationConfig(batch_size=2, new_tokens_factor=0.5, min_new_tokens_cap=8)
    base = build_setting("baseline", model)
    alone = translate(model, tok, [short], base, config, progress=False)
    both = translate(model, tok, [long, short], base, config, progress=False)
    assert both["tokens"][1][:6] == alone["tokens"][0][:6]
    kv = translate(model, tok, [long, short], build_setting("kv:bits=8,residual_length=8,block_size=8", model),
                   config, progress=False)
    assert len(kv["hypotheses"]) == 2 and all(kv["tokens"])
    assert kv["batches"][0]["stats"]["bits"] == 8


def test_precision_setting_records_telemetry_and_leaves_top_tier():
    """Guards against the precision setting losing its controller's telemetry or leaving the model in a
    cheap tier (and hooks installed) for whatever runs after it."""
    model = make_tiny_model("llama")
    ids = torch.randint(1, 128, (1, 16))
    setting = build_setting("precision:high=0.9,low=0.6", model)
    assert setting.in_place and setting.params["top"] == "fp32"
    result = measure_speed(model, ids, setting, SpeedConfig(1, 16, 6, 0, 1))
    telemetry = result["runs"][0]["stats"]["telemetry"]
    assert telemetry["steps"] == 6 and sum(telemetry["tier_steps"].values()) == 6
    tiers = model._hf_adaptive_eval_tiers[1]
    assert tiers.active == tiers.top
    assert not model.get_output_embeddings()._forward_hooks


def test_precision_setting_takes_the_decision_lag_and_score_terms():
    """Guards the knobs a BLEU run needs to match overlapped decoding (``lag=1``) and to try another score: they reach
    the controller and the recorded params; a bad value fails when the setting is built, naming the parameter."""
    from hf_adaptive.precision.confidence import ConfidenceWeights

    model = make_tiny_model("llama")
    setting = build_setting("precision:high=0.5,low=0.4,lag=1,p_max=0,entropy=0,margin=1,margin_scale=20", model)
    assert setting.params == {"fast": "int4", "top": "fp32", "high": 0.5, "low": 0.4, "lag": 1, "p_max": 0.0, "entropy": 0.0,
                              "margin": 1.0, "margin_scale": 20.0}
    kwargs = setting.generate_kwargs()
    controller = kwargs["logits_processor"][0]
    assert controller.decision_lag == 1
    assert controller.weights == ConfidenceWeights(p_max=0, entropy=0, margin=1, margin_scale=20)
    setting.collect(kwargs)
    with pytest.raises(ValueError, match="decision_lag"):
        build_setting("precision:lag=2", model)
    with pytest.raises(ValueError, match="margin_scale"):
        build_setting("precision:margin_scale=0", model)
    with pytest.raises(ValueError, match="unknown parameter"):
        build_setting("precision:weight=1", model)
