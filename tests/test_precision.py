"""Token-level precision switching: confidence, policy, tiers, controller, engine, verified mode."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import make_tiny_model

from hf_adaptive.policy.precision_policy import (PrecisionPolicy, PrecisionPolicyConfig, combine_scores,
                                                 draft_length, tier_for_score)
from hf_adaptive.precision.confidence import ConfidenceWeights, confidence_metrics, confidence_score
from hf_adaptive.precision.controller import PrecisionController, default_policy_config
from hf_adaptive.precision.decode import decode
from hf_adaptive.precision.graph_decode import GraphDecodeConfig, GraphDecodeEngine
from hf_adaptive.precision.int4 import choose_group_size, dequantize_int4_reference, int4_linear, pack_int4
from hf_adaptive.precision.options import DecodeOptions, DraftOptions
from hf_adaptive.precision.telemetry import PrecisionTelemetry
from hf_adaptive.precision.tiers import TieredLinear, prepare_tiers
from hf_adaptive.precision.verified import generate_verified, mismatch_report

CFG = PrecisionPolicyConfig(fast_tier="int4", mid_tier="native", top_tier="fp32")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _confident_model(arch: str = "llama"):
    """Tiny model with a sharpened lm_head so confidences spread over all three bands."""
    model = make_tiny_model(arch)
    with torch.no_grad():
        model.lm_head.weight.mul_(60)
    return model


def _prompt(batch: int = 1, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[:, ids.shape[1]:]


# ---------------------------------------------------------------- policy (pure)

@pytest.mark.parametrize("score,tier", [(0.95, "int4"), (0.9, "native"), (0.75, "native"), (0.6, "native"),
                                        (0.59, "fp32"), (0.0, "fp32"), (1.0, "int4")])
def test_policy_bands(score, tier):
    """Guards against off-by-one band edges (>0.9 fast, 0.6..0.9 native, <0.6 top)."""
    assert tier_for_score(score, CFG) == tier


def test_policy_combine_and_dwell():
    """Guards against a batch running the fast tier while one sequence is unsure, and dwell ignored."""
    assert combine_scores([0.95, 0.3, 0.99], "min") == 0.3
    assert combine_scores([0.0, 1.0], "mean") == 0.5
    assert math.isclose(combine_scores([0.0, 0.5, 1.0], "quantile", 0.25), 0.25)
    policy = PrecisionPolicy(CFG)
    assert policy.decide([0.95, 0.3]) == "fp32"
    dwell = PrecisionPolicy(PrecisionPolicyConfig(fast_tier="int4", mid_tier="native", top_tier="fp32",
                                                  min_dwell_steps=3))
    assert [dwell.decide([s]) for s in (0.95, 0.95, 0.95, 0.1, 0.1)] == ["fp32", "fp32", "int4", "int4", "int4"]
    assert [draft_length(s, 4, CFG) for s in (0.95, 0.7, 0.1)] == [4, 2, 0]
    with pytest.raises(ValueError, match="combine"):
        PrecisionPolicyConfig(combine="max")


# ---------------------------------------------------------------- confidence

def test_confidence_metrics_hand_computed():
    """Guards against wrong entropy base, margin sign, or an unclamped score."""
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)],
                           [0.0, 0.0, 0.0],
                           [100.0, 0.0, -float("inf")]])
    m = confidence_metrics(logits)
    ent0 = 0.5 * math.log(2) + 0.5 * math.log(4)
    assert torch.allclose(m["p_max"][:2], torch.tensor([0.5, 1 / 3]))
    assert torch.allclose(m["entropy"][:2], torch.tensor([ent0, math.log(3)]))
    assert torch.allclose(m["margin"][:2], torch.tensor([math.log(2), 0.0]))
    row0 = torch.tensor([math.log(0.5), math.log(0.25), math.log(0.25)])
    assert torch.isclose(m["variance"][0], ((row0 - row0.mean()) ** 2).mean())
    score = confidence_score(logits)
    expected0 = 0.5 * 0.5 + 0.3 * (1 - ent0 / 4) + 0.2 * math.log(2) / 10
    assert torch.isclose(score[0], torch.tensor(expected0))
    assert score[2].item() == 1.0 and torch.isfinite(score).all()
    w = ConfidenceWeights(p_max=1.0, entropy=0.0, margin=0.0)
    assert torch.isclose(confidence_score(logits, w)[1], torch.tensor(1 / 3))


# ---------------------------------------------------------------- int4 tiers

@pytest.mark.parametrize("n,k,g", [(32, 96, 32), (96, 576, 64), (64, 256, 128)])
def test_int4_cpu_kernel_matches_dequantized_reference(n, k, g):
    """Guards against a wrong nibble/scale layout: kernel output must equal x @ dequant(W).T."""
    torch.manual_seed(0)
    w, x = torch.randn(n, k), torch.randn(3, k)
    assert choose_group_size(k, n, 128) == g
    y = int4_linear(x, pack_int4(w, g, torch.float32))
    ref = x @ dequantize_int4_reference(w, g).T
    assert torch.allclose(y, ref, atol=1e-3, rtol=1e-4)


def test_prepare_tiers_replaces_decoder_linears_and_dispatches():
    """Guards against a selector that does not reach the layers (every tier giving the same logits)."""
    model = make_tiny_model("llama")
    ids = _prompt(2)
    ref = model(ids).logits
    tiers = prepare_tiers(model, tiers=("native", "int4", "fp32"))
    assert tiers.ladder == ("int4", "native", "fp32") and tiers.active == "fp32"
    n_linear = sum(isinstance(m, TieredLinear) for m in model.modules())
    assert n_linear == 2 * 7 + 1 and isinstance(model.lm_head, TieredLinear)
    assert torch.equal(model(ids).logits, ref)
    with tiers.use("int4"):
        low = model(ids).logits
    assert 0 < (low - ref).abs().max() < 1.0
    mem = tiers.memory_bytes()
    assert mem["int4"] < 0.3 * mem["fp32"] and mem["native"] == mem["fp32"] // 2
    with pytest.raises(ValueError, match="tiers must be"):
        prepare_tiers(make_tiny_model("llama"), tiers=("int3",))


# ---------------------------------------------------------------- controller

def test_controller_returns_scores_unchanged_and_reads_raw_logits():
    """Guards against the controller editing scores, or scoring temperature-scaled instead of raw logits."""
    model = make_tiny_model("llama")
    tiers = prepare_tiers(model, tiers=("int4", "fp32"))
    ctl = PrecisionController(tiers)
    ids = _prompt(2)
    raw = model(ids).logits[:, -1, :]  # the lm_head hook now holds these
    processed = raw / 0.05
    before = processed.clone()
    out = ctl(ids, processed)
    assert out is processed and torch.equal(out, before)
    assert ctl.telemetry.scores == pytest.approx(confidence_score(raw).tolist())
    assert ctl.telemetry.scores != pytest.approx(confidence_score(processed).tolist())
    ctl.close()


def test_controller_switches_tiers_with_sampling_and_batch(tiny_model):
    """Guards against a controller that never switches, or breaks sampling / batched generate."""
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(60)
    tiers = prepare_tiers(tiny_model, tiers=("int4", "native", "fp32"))
    ctl = PrecisionController(tiers)
    ids = _prompt(3)
    torch.manual_seed(0)
    out = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=True,
                              temperature=0.8, top_k=20, logits_processor=[ctl])
    rep = ctl.telemetry.report()
    assert out.shape == (3, 34) and rep["steps"] == 24
    assert len(rep["tier_steps"]) >= 2 and rep["switches"] >= 1
    json.dumps(rep)
    ctl.close()


def test_controller_with_adaptive_kv_cache():
    """Guards against the tier switch and AdaptiveKVCache interfering (output must match DynamicCache run)."""
    from hf_adaptive.kv.cache import AdaptiveKVCache, generate_cache_kwargs

    model = _confident_model()
    tiers = prepare_tiers(model, tiers=("int4", "native", "fp32"))
    ids = _prompt(2, 12)
    runs = []
    for cache in (None, AdaptiveKVCache(model.config, residual_length=64, block_size=8)):
        ctl = PrecisionController(tiers)
        kwargs = generate_cache_kwargs(cache) if cache is not None else {}
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             logits_processor=[ctl], **kwargs)
        runs.append((out, ctl.telemetry.tiers))
        ctl.close()
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert len(set(runs[0][1])) >= 2


# ---------------------------------------------------------------- engine + verified mode

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engine_top_tier_matches_generate(arch):
    """Guards against a wrong 4D mask / position / static-cache offset in the graph decode path."""
    model = make_tiny_model(arch)
    ids = _prompt(2)
    ref = _greedy(model, ids, 16)
    engine = GraphDecodeEngine(prepare_tiers(model, ("int4", "fp32")), GraphDecodeConfig(batch_size=2, max_len=64))
    assert torch.equal(decode(engine, ids, DecodeOptions(max_new_tokens=16)), ref)
    assert torch.equal(decode(engine, ids, DecodeOptions(max_new_tokens=16)), ref)  # engine reuse


def test_engine_warm_up_leaves_prompt_kv_and_tokens_intact():
    """Guards against the CUDA-graph warm-up (which really executes) writing dummy-token KV over the
    prompt: it ran at position 0 and corrupted the first verify_len prompt entries (graph != eager on H100)."""
    model = make_tiny_model("llama")
    ids = _prompt(2)
    engine = GraphDecodeEngine(prepare_tiers(model, ("int4", "fp32")),
                               GraphDecodeConfig(batch_size=2, max_len=64, verify_len=5))
    ref = decode(engine, ids, DecodeOptions(max_new_tokens=12))
    logits = engine.prefill(ids)
    t = ids.shape[1]
    before = [layer.keys[:, :, :t].clone() for layer in engine.cache.layers]
    for tier, q in engine._shapes():  # what _capture_all runs before each capture, minus the capture
        with engine.tiers.use(tier):
            engine._warm_up(q)
    for layer, keys in zip(engine.cache.layers, before):
        assert torch.equal(layer.keys[:, :, :t], keys)
    toks = [logits.argmax(-1)]
    for _ in range(11):  # decode after a warm-up, continuing from the warm-up's scratch slots
        toks.append(engine.forward(engine.tiers.top, toks[-1][:, None])[:, -1].argmax(-1))
    assert torch.equal(torch.stack(toks, 1), ref)


def test_engine_lossy_controller_records_agreement():
    """Guards against lossy decode ignoring the controller or agreement sampling corrupting state."""
    model = _confident_model()
    tiers = prepare_tiers(model, ("int4", "native", "fp32"))
    ctl = PrecisionController(tiers)
    engine = GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=2, max_len=64))
    out = decode(engine, _prompt(2), DecodeOptions(max_new_tokens=24, controller=ctl, agreement_every=1))
    rep = ctl.telemetry.report()
    assert out.shape == (2, 24) and len(rep["tier_steps"]) >= 2
    assert sum(b["checked"] for b in rep["confidence_accuracy"]) > 0
    with pytest.raises(ValueError, match="sliding"):
        GraphDecodeEngine(prepare_tiers(make_tiny_model("gemma3"), ("int4", "fp32")))


@pytest.mark.parametrize("arch,adaptive", [("llama", True), ("qwen2", True), ("llama", False)])
def test_verified_mode_token_identical_tiny(arch, adaptive, tmp_path):
    """Guards against accepting a draft token the top tier would not pick, or stale KV after rejection."""
    model = _confident_model(arch)
    ids = _prompt(1, seed=3)
    ref = _greedy(model, ids, 40)
    tiers = prepare_tiers(model, ("int4", "fp32"))
    engine = GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=1, max_len=128, verify_len=5))
    policy = PrecisionPolicyConfig(fast_tier="int4", mid_tier="fp32", top_tier="fp32", low=0.3)
    draft = DraftOptions(max_draft=4, policy=policy, adaptive=adaptive)
    opts = DecodeOptions(max_new_tokens=40, draft=draft)
    out = generate_verified(engine, ids, opts)
    assert torch.equal(out, ref)
    rep = draft.telemetry.report()
    checked = sum(b["checked"] for b in rep["confidence_accuracy"])
    assert checked > 0 and rep["tier_steps"].get("int4", 0) > 0
    draft.telemetry.plot(tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_first_near_tie_finds_rows_within_rounding_steps():
    """Guards the near-tie test against a wrong index or a margin in absolute units: rows whose top-2 gap is
    within N rounding steps of their dtype count, others do not."""
    from hf_adaptive.precision.verified import _first_near_tie

    logits = torch.tensor([[8.0, 1.0, 0.0], [8.0, 8.0 - 1 / 32, 0.0], [8.0, 8.0, 0.0]], dtype=torch.bfloat16)
    # bf16 rounding step at magnitude 8: 8 * 2**-7 = 1/16; row 1's gap 1/32 and row 2's 0 are within 2 steps
    assert int(_first_near_tie(logits, 2.0)) == 1
    assert int(_first_near_tie(logits[:1], 2.0)) == 1  # none: the row count
    assert int(_first_near_tie(logits, 0.0)) == 3      # disabled
    assert int(_first_near_tie(logits[[0, 2]], 2.0)) == 1


@pytest.mark.parametrize("margin", [2.0**18, 1e12])
def test_verified_mode_settles_near_ties_with_one_token_forwards(margin):
    """Guards the near-tie path (a verify row too close to call is re-decided by a 1-token forward): output stays
    greedy, drafts verified before the tie are kept (some rounds still accept), and the path really runs."""
    model = _confident_model("llama")
    ids = _prompt(1, seed=3)
    ref = _greedy(model, ids, 40)
    tiers = prepare_tiers(model, ("int4", "fp32"))
    engine = GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=1, max_len=128, verify_len=5))
    policy = PrecisionPolicyConfig(fast_tier="int4", mid_tier="fp32", top_tier="fp32", low=0.3)
    draft = DraftOptions(max_draft=4, policy=policy, adaptive=False, tie_margin_steps=margin)
    opts = DecodeOptions(max_new_tokens=40, draft=draft)
    assert torch.equal(generate_verified(engine, ids, opts), ref)
    assert draft.tie_rounds > 0
    assert draft.tie_rounds <= sum(1 for k, _ in draft.history if k)  # a draft-less round is never re-run
    if margin < 1e6:  # some rows clear a moderate margin: their drafts are still accepted
        assert any(acc > 0 for _, acc in draft.history)


@pytest.mark.slow
def test_verified_mode_compiled_engine_token_identical_tiny():
    """Guards against the compiled engine (GraphDecodeConfig.compile, the fast path of bench --compile)
    tracing the SDPA backend context, graph-breaking, or changing verified mode's tokens."""
    torch._dynamo.reset()
    model = _confident_model("llama")
    ids = _prompt(1, seed=3)
    ref = _greedy(model, ids, 24)
    tiers = prepare_tiers(model, ("int4", "fp32"))
    engine = GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=1, max_len=96, verify_len=5, compile=True))
    policy = PrecisionPolicyConfig(fast_tier="int4", mid_tier="fp32", top_tier="fp32", low=0.3)
    draft = DraftOptions(max_draft=4, policy=policy)
    opts = DecodeOptions(max_new_tokens=24, draft=draft)
    out = generate_verified(engine, ids, opts)
    assert not dict(torch._dynamo.utils.counters["graph_break"])
    assert torch.equal(out, ref)
    assert any(k > 0 for k, _ in draft.history)  # the int4 draft graph really ran


@pytest.mark.slow
def test_verified_mode_token_identical_smollm2(smollm2):
    """Guards against int4 group-size handling at hidden 576 (g=64) breaking losslessness on a real model."""
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ref = _greedy(model, ids, 12)
    tiers = prepare_tiers(model, ("int4", "fp32"))
    try:
        engine = GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=1, max_len=64, verify_len=4))
        policy = PrecisionPolicyConfig(fast_tier="int4", mid_tier="fp32", top_tier="fp32")
        draft = DraftOptions(max_draft=3, policy=policy)
        opts = DecodeOptions(max_new_tokens=12, draft=draft)
        assert torch.equal(generate_verified(engine, ids, opts), ref)
    finally:
        _unprepare(model)


def _unprepare(model) -> None:
    """Put the original nn.Linear modules back (the smollm2 fixture is session-wide)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TieredLinear):
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                lin.weight, lin.bias = child.weight, child.bias
                setattr(parent, name, lin)


def test_telemetry_report_is_json():
    """Guards against telemetry reports that json.dumps rejects or miscount switches."""
    t = PrecisionTelemetry()
    for tier, s in (("fp32", 0.2), ("int4", 0.95), ("int4", 0.97), ("fp32", 0.1)):
        t.record_step(tier, [s], 1000)
    t.record_agreement(0.95, True)
    t.record_agreement(0.97, False)
    rep = json.loads(json.dumps(t.report()))
    assert rep["switches"] == 2 and rep["tier_fraction"] == {"fp32": 0.5, "int4": 0.5}
    assert rep["confidence_accuracy"][9] == {"bucket": [0.9, 1.0], "checked": 2, "agree_fraction": 0.5}
    assert rep["controller_overhead_us"]["mean"] == 1.0


def test_controller_decision_lag_applies_one_step_later():
    """Guards against the lag-1 path deciding from the wrong step (or never switching)."""
    model = _confident_model()
    tiers = prepare_tiers(model, ("int4", "native", "fp32"))
    ctl = PrecisionController(tiers)
    engine = GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=2, max_len=64))
    decode(engine, _prompt(2), DecodeOptions(max_new_tokens=24, controller=ctl, decision_lag=1))
    ran, flat = ctl.telemetry.tiers, ctl.telemetry.scores
    per_step = [flat[i:i + 2] for i in range(0, len(flat), 2)]  # record 0 has no scores yet
    policy = PrecisionPolicy(default_policy_config(tiers))
    expected = ["fp32", "fp32"] + [policy.decide(s) for s in per_step[:len(ran) - 2]]
    assert ran == expected and len(set(ran)) >= 2


def test_mismatch_report_separates_near_ties_from_bugs():
    """Guards against the GPU verified-mode check waving through a real divergence as "bf16 rounding":
    only a greedy top-2 gap within two rounding steps of the logit dtype counts as a near-tie."""
    ref = torch.tensor([[5, 7, 9]])
    out = torch.tensor([[5, 8, 1]])
    logits = torch.zeros(1, 3, 16)
    logits[0, 1, 7], logits[0, 1, 8] = 100.0, 99.5  # bf16 step at 100 is 0.5: a near-tie in bf16
    rep = mismatch_report(out, ref, logits, torch.bfloat16)
    assert rep["first_mismatch"] == 1 and rep["greedy_gap_at_mismatch"] == 0.5 and rep["near_tie"]
    assert not mismatch_report(out, ref, logits, torch.float32)["near_tie"]  # fp32 step ~1e-5
    logits[0, 1, 8] = 97.0
    assert not mismatch_report(out, ref, logits, torch.bfloat16)["near_tie"]
    assert mismatch_report(ref, ref, logits, torch.bfloat16) == {"token_identical": True, "first_mismatch": None}


@pytest.mark.parametrize("deterministic", [True, False])
def test_engine_forwards_exclude_cudnn_sdpa(deterministic):
    """Guards against the engine's forwards (prefill, capture, eager decode) running cuDNN SDPA, which gave
    run-to-run different bf16 logits on an H100 and broke verified mode's identity with top-tier greedy."""
    model = make_tiny_model("llama")
    engine = GraphDecodeEngine(prepare_tiers(model, ("int4", "fp32")),
                               GraphDecodeConfig(batch_size=1, max_len=32, deterministic_attention=deterministic))
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_hook(
        lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    try:
        decode(engine, _prompt(1), DecodeOptions(max_new_tokens=3))
    finally:
        hook.remove()
    assert seen == [not deterministic] * 3 and torch.backends.cuda.cudnn_sdp_enabled()
