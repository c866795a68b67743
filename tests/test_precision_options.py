"""The one options type of the graph-engine decode loops: each bad field fails at construction by name, and a
loop refuses a field it cannot honour instead of ignoring it."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_model

import hf_adaptive
from hf_adaptive.policy.precision_policy import PrecisionPolicyConfig
from hf_adaptive.precision.confidence import ConfidenceWeights
from hf_adaptive.precision.decode import decode
from hf_adaptive.precision.fused_decode import FusedStepDecoder
from hf_adaptive.precision.graph_decode import GraphDecodeConfig, GraphDecodeEngine
from hf_adaptive.precision.options import DecodeOptions, DraftOptions
from hf_adaptive.precision.tiers import prepare_tiers
from hf_adaptive.precision.verified import generate_verified


@pytest.mark.parametrize("kwargs,field,error", [
    ({"max_new_tokens": 0}, "max_new_tokens", ValueError),
    ({"max_new_tokens": 4.0}, "max_new_tokens", TypeError),
    ({"controller": "int4"}, "controller", TypeError),
    ({"schedule": ()}, "schedule", TypeError),
    ({"schedule": "int4"}, "schedule", TypeError),
    ({"tier": 4}, "tier", TypeError),
    ({"do_sample": 1}, "do_sample", TypeError),
    ({"temperature": 0.0}, "temperature", ValueError),
    ({"temperature": float("nan")}, "temperature", ValueError),
    ({"generator": 7}, "generator", TypeError),
    ({"agreement_every": -1}, "agreement_every", ValueError),
    ({"decision_lag": 2}, "decision_lag", ValueError),
    ({"draft": {"max_draft": 4}}, "draft", TypeError),
])
def test_decode_options_name_the_bad_field(kwargs, field, error):
    """Guards against a bad option surfacing steps later as a shape or index error (or not at all)."""
    with pytest.raises(error, match=rf"DecodeOptions\.{field} .*got .*Fix"):
        DecodeOptions(**kwargs)


@pytest.mark.parametrize("kwargs,field,error", [
    ({"max_draft": 0}, "max_draft", ValueError),
    ({"policy": {"high": 0.9}}, "policy", TypeError),
    ({"weights": None}, "weights", TypeError),
    ({"tier": 0}, "tier", TypeError),
    ({"adaptive": "yes"}, "adaptive", TypeError),
    ({"tie_margin_steps": -1.0}, "tie_margin_steps", ValueError),
    ({"telemetry": []}, "telemetry", TypeError),
])
def test_draft_options_name_the_bad_field(kwargs, field, error):
    with pytest.raises(error, match=rf"DraftOptions\.{field} .*got .*Fix"):
        DraftOptions(**kwargs)


def test_public_names_are_the_one_type():
    """Guards against the exported fused-loop name drifting from the type the loops take."""
    assert hf_adaptive.FusedOptions is hf_adaptive.DecodeOptions is DecodeOptions
    assert hf_adaptive.DraftOptions is DraftOptions


def test_clear_record_forgets_rounds_only():
    draft = DraftOptions()
    draft.history.append((4, 2))
    draft.tie_rounds = 3
    draft.telemetry.record_step("int4", [0.5])
    draft.clear_record()
    assert draft.history == [] and draft.tie_rounds == 0 and draft.telemetry.tiers == ["int4"]


@pytest.fixture(scope="module")
def engine():
    tiers = prepare_tiers(make_tiny_model("llama"), ("int4", "fp32"))
    return GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=1, max_len=48, verify_len=3))


def _ids() -> torch.Tensor:
    return torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("loop,opts,field", [
    ("decode", DecodeOptions(max_new_tokens=4, draft=DraftOptions(max_draft=2)), "draft"),
    ("fused", DecodeOptions(max_new_tokens=4, do_sample=True), "do_sample"),
    ("fused", DecodeOptions(max_new_tokens=4, agreement_every=2), "agreement_every"),
    ("fused", DecodeOptions(max_new_tokens=4, draft=DraftOptions(max_draft=2)), "draft"),
    ("verified", DecodeOptions(max_new_tokens=4, tier="int4", draft=DraftOptions(max_draft=2)), "tier"),
    ("verified", DecodeOptions(max_new_tokens=4, schedule=("int4",), draft=DraftOptions(max_draft=2)), "schedule"),
    ("verified", DecodeOptions(max_new_tokens=4, do_sample=True, draft=DraftOptions(max_draft=2)), "do_sample"),
    ("verified", DecodeOptions(max_new_tokens=4), "draft"),
])
def test_each_loop_refuses_what_it_cannot_honour(engine, loop, opts, field):
    """Guards against a loop silently ignoring an option of the shared type (a greedy run asked to sample)."""
    run = {"decode": lambda: decode(engine, _ids(), opts),
           "fused": lambda: FusedStepDecoder(engine, capacity=8).generate(_ids(), opts),
           "verified": lambda: generate_verified(engine, _ids(), opts)}[loop]
    with pytest.raises(ValueError, match=rf"DecodeOptions\.{field} must be .*got .*Fix"):
        run()


def test_the_same_options_drive_every_loop(engine):
    """One options object runs the eager loop, the fused loop and verified mode: all top-tier greedy here."""
    opts = DecodeOptions(max_new_tokens=6)
    eager = decode(engine, _ids(), opts)
    fused = FusedStepDecoder(engine, capacity=8).generate(_ids(), opts)
    policy = PrecisionPolicyConfig(fast_tier="int4", mid_tier="fp32", top_tier="fp32")
    draft = DraftOptions(max_draft=2, policy=policy)
    verified = generate_verified(engine, _ids(), DecodeOptions(max_new_tokens=6, draft=draft))
    assert torch.equal(eager, fused) and torch.equal(eager, verified)
    assert draft.history and draft.telemetry.tiers


@pytest.mark.parametrize("kwargs,field,error", [
    ({"p_max": -0.5}, "p_max", ValueError),
    ({"entropy": float("nan")}, "entropy", ValueError),
    ({"margin": "0.2"}, "margin", TypeError),
    ({"margin_scale": 0.0}, "margin_scale", ValueError),
    ({"entropy_scale_nats": -4.0}, "entropy_scale_nats", ValueError),
])
def test_confidence_weights_name_the_bad_field(kwargs, field, error):
    """Guards against a NaN or negative weight turning every confidence score into NaN or a clamp at 0."""
    with pytest.raises(error, match=rf"ConfidenceWeights\.{field} .*got .*Fix"):
        ConfidenceWeights(**kwargs)


@pytest.mark.parametrize("kwargs,field,error", [
    ({"batch_size": 0}, "batch_size", ValueError),
    ({"max_len": 1}, "max_len", ValueError),
    ({"verify_len": -1}, "verify_len", ValueError),
    ({"warmup_iters": 1.5}, "warmup_iters", TypeError),
    ({"use_cuda_graphs": "yes"}, "use_cuda_graphs", TypeError),
])
def test_graph_config_names_the_bad_field(kwargs, field, error):
    with pytest.raises(error, match=rf"GraphDecodeConfig\.{field} .*got .*Fix"):
        GraphDecodeConfig(**kwargs)
