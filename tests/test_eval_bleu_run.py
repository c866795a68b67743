"""run_bleu_eval end to end on a tiny checkpoint: partial reports, the timing-noise check, CPU labels."""

from __future__ import annotations

import json

import pytest

from hf_adaptive.evaluation.bleu import BleuEvalConfig, replot_bleu, run_bleu_eval, timing_noise_note
from hf_adaptive.evaluation.random_model import export_model_config, load_random_model
from hf_adaptive.evaluation.translate import TranslationConfig

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}
FAST = TranslationConfig(batch_size=2, new_tokens_factor=0.25, min_new_tokens_cap=4)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A saved 2-layer Llama with SmolLM2's tokenizer and chat template (random weights: fast, not fluent)."""
    out = tmp_path_factory.mktemp("tiny_ckpt")
    export_model_config(None, out)
    (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()), **TINY}))
    model, _ = load_random_model(out, device="cpu", dtype="float32")
    model.save_pretrained(out)
    return out


def _config(out_dir, model_dir, settings):
    return BleuEvalConfig(out_dir=out_dir, model=str(model_dir), limit=3, settings=settings, device="cpu",
                          dtype="float32", translation=FAST)


def test_cpu_bleu_report_measures_noise_and_does_not_call_it_a_speedup(tiny_checkpoint, tmp_path):
    """Guards against presenting sequential CPU tokens/s ratios as a speedup: the Markdown must rename the
    column and report the measured load drift (same baseline batch re-timed at the end); and against
    plots that cannot be redrawn from the saved JSON."""
    result = run_bleu_eval(_config(tmp_path / "out", tiny_checkpoint, ("baseline", "kv4")), progress=False)
    data = json.loads(result["paths"]["json"].read_text())
    check = data["timing_check"]
    assert check["verses"] == 2 and check["start_s"] > 0 and check["end_s"] > 0 and check["after"] == "kv4"
    assert data["pending_settings"] == [] and [r["setting"] for r in data["summary"]] == ["baseline", "kv4"]
    assert "speedup" in data["summary"][1]  # the JSON key stays for tools; only the page relabels it
    md = result["paths"]["md"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| setting"))
    assert "tput_ratio_noisy" in header and "speedup" not in header
    assert "Timing noise: the baseline's first batch (2 verses) took" in md and "because it is not one" in md
    result["paths"]["png"].unlink()
    assert replot_bleu(tmp_path / "out").read_bytes().startswith(b"\x89PNG")  # redrawn from bleu.json alone


def test_finished_settings_survive_a_failing_later_setting(tiny_checkpoint, tmp_path):
    """Guards against an hour-long CPU run losing every finished setting when a later one fails or is
    stopped: the report is rewritten after each setting and names what is still pending."""
    with pytest.raises(ValueError, match="fixed_bits"):
        run_bleu_eval(_config(tmp_path / "out", tiny_checkpoint, ("baseline", "kv:bits=3")), progress=False)
    data = json.loads((tmp_path / "out" / "bleu.json").read_text())
    assert [r["setting"] for r in data["summary"]] == ["baseline"]
    assert data["pending_settings"] == ["kv:bits=3"] and data["timing_check"] is None
    md = (tmp_path / "out" / "bleu.md").read_text()
    assert "Partial report: settings not run yet: ['kv:bits=3']" in md
    assert (tmp_path / "out" / "bleu_pareto.png").read_bytes().startswith(b"\x89PNG")


def test_timing_noise_note_flags_ratios_inside_the_drift_band():
    """Guards against the noise verdict comparing the wrong way round (start/end) or missing settings
    whose tokens/s ratio load drift alone explains."""
    rows = [{"setting": "baseline", "speedup": 1.0}, {"setting": "kv8", "speedup": 1.15},
            {"setting": "kv4", "speedup": 0.7}, {"setting": "precision", "speedup": 1.3}]
    note = timing_noise_note({"verses": 16, "start_s": 12.0, "end_s": 10.0, "after": "precision"}, rows)
    assert "'sped up' 1.200x" in note and "['kv8']" in note and "16 verses" in note
    quiet = timing_noise_note({"verses": 16, "start_s": 10.0, "end_s": 10.0}, rows)
    assert "none of the settings" in quiet
    assert "not measured yet" in timing_noise_note(None, rows)


def test_tier_fraction_sums_controller_steps_over_batches():
    """Guards the precision columns of the BLEU report: the share of steps per tier must be summed over all
    batches (a per-batch average would overweight short batches) and absent for settings without a controller."""
    from hf_adaptive.evaluation.bleu import _tier_fraction

    batches = [{"stats": {"telemetry": {"tier_steps": {"int4": 3, "native": 1}}}},
               {"stats": {"telemetry": {"tier_steps": {"native": 4}}}}, {"stats": {}}]
    assert _tier_fraction(batches) == {"int4": 0.375, "native": 0.625}
    assert _tier_fraction([{"stats": {"kv_bytes": 1}}]) is None
