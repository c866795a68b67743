"""Precision switching, graph path: in-graph tier decision and token pick (FusedStepDecoder), verified cost model."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import decode_both_paths, make_tiny_model

from hf_adaptive.policy.precision_policy import (PrecisionPolicy, PrecisionPolicyConfig, combine_scores,
                                                 expected_tokens_per_round, tier_for_score, verified_speedup)
from hf_adaptive.precision.confidence import confidence_score
from hf_adaptive.precision.controller import PrecisionController
from hf_adaptive.precision.decode import decode
from hf_adaptive.precision.device_decision import DeviceDecision
from hf_adaptive.precision.fused_decode import FusedStepDecoder, decision_for
from hf_adaptive.precision.graph_decode import GraphDecodeConfig, GraphDecodeEngine
from hf_adaptive.precision.options import DecodeOptions
from hf_adaptive.precision.tiers import prepare_tiers

LADDER = ("int4", "native", "fp32")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompt(batch: int, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _tiers(dwell: int = 1):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(60)  # confident logits: all three bands occur
    return prepare_tiers(model, LADDER)


@pytest.mark.parametrize("combine", ["min", "mean", "quantile"])
@pytest.mark.parametrize("batch", [1, 3])
def test_device_decision_equals_host_policy(combine, batch):
    """Guards against the in-graph band math drifting from the eager controller's (band edges, combine
    mode, fp32-vs-float64 threshold comparison, ladder index order)."""
    policy = PrecisionPolicyConfig(fast_tier="int4", mid_tier="native", top_tier="fp32", combine=combine,
                                   quantile=0.3)
    decision = DeviceDecision(policy, LADDER)
    gen = torch.Generator().manual_seed(1)
    seen = set()
    for i in range(300):
        logits = torch.randn(batch, 50, generator=gen) * (0.2 + 0.1 * i)
        status = decision(logits).tolist()
        scores = confidence_score(logits).tolist()
        expected = tier_for_score(combine_scores(scores, combine, 0.3), policy)
        assert decision.tier_name(status[0]) == expected and status[1:] == scores
        seen.add(expected)
    assert seen == set(LADDER)
    edge = DeviceDecision(PrecisionPolicyConfig(fast_tier="int4", mid_tier="native", top_tier="fp32"), LADDER)
    for score, tier in ((0.9, "native"), (0.90001, "int4"), (0.6, "native"), (0.59999, "fp32")):
        assert LADDER[int(edge.band_index(torch.tensor(score, dtype=torch.float64)))] == tier


@pytest.mark.parametrize("lag", [0, 1])
def test_fused_decode_matches_eager_controller(lag):
    """Guards against the in-graph decision choosing a different tier schedule (or tokens, or recorded
    confidences) than the eager PrecisionController on the graph engine, at decision lag 0 and 1."""
    tiers, ids = _tiers(), _prompt(2)
    runs = decode_both_paths(tiers, ids, None, max_len=64, new_tokens=24, lag=lag)
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and runs[0][2] == runs[1][2]
    assert set(runs[1][1]) == set(LADDER) and len(runs[1][1]) == 24


def test_fused_decode_dwell_and_fixed_tiers():
    """Guards against the host-side dwell rule being skipped on the fused path, and against the fused
    step's token pick / position advance differing from the engine's one-token decode (fixed tier and
    replayed schedule, engine reused)."""
    tiers, ids = _tiers(), _prompt(1, seed=2)
    policy = PrecisionPolicyConfig(fast_tier="int4", mid_tier="native", top_tier="fp32", min_dwell_steps=3)
    ctl = PrecisionController(tiers, policy)
    engine = GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=1, max_len=64))
    dec = FusedStepDecoder(engine, decision_for(ctl), capacity=32)
    dec.generate(ids, DecodeOptions(max_new_tokens=30, controller=ctl))
    ran, scores = ctl.telemetry.tiers, ctl.telemetry.scores
    host = PrecisionPolicy(policy)
    assert ran == ["fp32"] + [host.decide([s]) for s in scores[:-1]] and ctl.telemetry.switches >= 1
    plain = FusedStepDecoder(engine, None, capacity=32)
    schedule = ("int4", "fp32", "native", "int4")
    for opts in (dict(tier="int4"), dict(schedule=schedule), dict(tier="fp32")):
        ref = decode(engine, ids, DecodeOptions(max_new_tokens=20, **opts))
        assert torch.equal(plain.generate(ids, DecodeOptions(max_new_tokens=20, **opts)), ref)
    with pytest.raises(ValueError, match="capacity"):
        plain.generate(ids, DecodeOptions(max_new_tokens=33))
    with pytest.raises(ValueError, match="decision_for"):
        plain.generate(ids, DecodeOptions(max_new_tokens=4, controller=ctl))
    ctl.close()


def test_verified_cost_model_arithmetic():
    """Guards against a cost model that credits verified mode with more tokens than a round can emit
    or forgets the verify forward's cost (the 1.5x target analysis depends on it)."""
    assert expected_tokens_per_round(4, 1.0) == 5.0 and expected_tokens_per_round(4, 0.0) == 1.0
    assert math.isclose(expected_tokens_per_round(2, 0.5), 1 + 0.5 + 0.25)
    # draft 2x faster than native, verify costs one native step, all accepted: 5 / (4 * 0.5 + 1)
    assert math.isclose(verified_speedup(1.0, 0.5, 1.0, 5.0, 4), 5 / 3)
    assert verified_speedup(1.0, 1.0, 1.0, 5.0, 4) == 1.0  # no faster draft: no gain even at 100 %
    with pytest.raises(ValueError, match="accept_rate"):
        expected_tokens_per_round(4, 1.5)


class _Counting(torch.nn.Module):
    def __init__(self, inner) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0
        self.selector = inner.selector

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_siblings_one_matmul_per_group_and_same_logits(arch):
    """Guards against q/k/v and gate/up fusion returning wrong column slices (or a stale output of an
    earlier input / another tier), silently falling back to one matmul per member, doubling the stored
    weights, or changing the model's state_dict."""
    ids = _prompt(2)
    plain, fused_model = make_tiny_model(arch), make_tiny_model(arch)
    ref_state = {k: v.clone() for k, v in plain.state_dict().items()}
    a = prepare_tiers(plain, LADDER, fuse=False)
    b = prepare_tiers(fused_model, LADDER)
    assert len(b.groups) == 2 * 2 and a.memory_bytes() == b.memory_bytes()
    counters = []
    for g in b.groups:
        g.fused = _Counting(g.fused)
        counters.append(g.fused)
    for tier in LADDER:  # the tier is part of the cache key: a stale output would repeat the fp32 one
        with a.use(tier):
            ref = plain(ids).logits
        with b.use(tier):
            assert torch.equal(fused_model(ids).logits, ref), tier
    assert [c.calls for c in counters] == [len(LADDER)] * len(counters)
    assert all(g._x is None for g in b.groups)  # activations released once every member took its slice
    k_proj = fused_model.model.layers[0].self_attn.k_proj
    x = torch.randn(3, k_proj.in_features)
    expected = x @ ref_state["model.layers.0.self_attn.k_proj.weight"].T
    expected = expected if k_proj.bias is None else expected + k_proj.bias
    assert torch.allclose(k_proj(x), expected, atol=1e-5)  # a lone member call, other input: still right
    assert all(torch.equal(fused_model.state_dict()[k], v) for k, v in ref_state.items())


@pytest.mark.slow
def test_compiled_fused_step_matches_eager_step():
    """Guards against the torch.compile'd fused step (bench --compile) graph-breaking on the fused
    sibling cache or the in-graph decision, or computing different tokens / confidences than the
    uncompiled step (tiny fp32 Llama on CPU; one tier, so one compile)."""
    torch._dynamo.reset()
    tiers, ids = _tiers(), _prompt(1, seed=4)
    policy = PrecisionPolicyConfig(fast_tier="int4", mid_tier="native", top_tier="fp32")
    runs = []
    for compiled in (False, True):
        ctl = PrecisionController(tiers, policy, read_raw_logits=False)
        engine = GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=1, max_len=48))
        dec = FusedStepDecoder(engine, decision_for(ctl), capacity=16, compile_step=compiled)
        out = dec.generate(ids, DecodeOptions(max_new_tokens=16, controller=ctl, schedule=("int4",)))
        ctl.close()
        runs.append((out, ctl.telemetry.scores))
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert not breaks, breaks
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[1][1] == pytest.approx(runs[0][1], abs=1e-5)


def test_device_decision_has_no_host_read():
    """Guards against a host sync (``.item()`` / a 0-d tensor used as an index) inside the decision:
    it stalls every step and is illegal inside CUDA-graph capture. Counts dispatched ops on CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    def host_reads(names: list[str]) -> list[str]:
        return [n for n in names if "local_scalar" in n or n.startswith("item")]

    policy = PrecisionPolicyConfig(fast_tier="int4", mid_tier="native", top_tier="fp32")
    for batch in (1, 3):
        decision = DeviceDecision(policy, LADDER)
        logits = torch.randn(batch, 1000).bfloat16()
        decision(logits)  # builds the per-device tables (done before capture on the graph path)
        with _Ops() as ops:
            decision(logits)
        assert not host_reads(ops.names), ops.names
    tiers = _tiers()  # the whole fused step: forward, token pick, position advance, decision
    dec = FusedStepDecoder(GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=2, max_len=32)),
                           DeviceDecision(policy, LADDER), capacity=8)
    dec.generate(_prompt(2), DecodeOptions(max_new_tokens=2))
    with _Ops() as ops, tiers.use("int4"):
        dec._step()
    assert not host_reads(ops.names) and "index_copy_.default" in ops.names, ops.names


def test_cli_graph_mode_on_smollm2(capsys, tmp_path):
    """Guards against `hf-adaptive precision --mode graph` (fused decoder with the in-graph decision on
    the real SmolLM2) crashing or returning no telemetry."""
    import argparse
    import json

    from hf_adaptive.commands.precision import precision_command

    args = argparse.Namespace(prompt="Say hello.", model=None, mode="graph", tiers=None, max_new_tokens=6,
                              max_draft=4, sample=False, device="cpu", int4_kernel="auto", json_path=str(tmp_path / "t.json"), plot=None)
    assert precision_command(args) == 0
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["steps"] == 6 and sum(report["tier_steps"].values()) == 6
    assert "6 tokens" in capsys.readouterr().out


def test_lazy_capture_warm_up_mid_generation_changes_nothing():
    """Guards against the capture warm-up (which really runs the step) corrupting a generation when a
    tier is first used mid-way or at the LAST step: it must restore ids / position / step index /
    status and keep its writes inside scratch KV slots and scratch output columns (an out-of-range
    column there is a device-side assert on CUDA). CPU harness: the CUDA capture is replaced by the
    same warm-up plus an eager replay."""
    tiers, ids = _tiers(), _prompt(2, seed=5)
    n = 12
    schedule = ("fp32",) * 5 + ("native",) * 5 + ("int4",)  # int4 first runs at step n - 1
    engine = GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=2, max_len=10 + n + 2))
    plain = FusedStepDecoder(engine, DeviceDecision(PrecisionPolicyConfig(
        fast_tier="int4", mid_tier="native", top_tier="fp32"), LADDER), capacity=n)
    ref = plain.generate(ids, DecodeOptions(max_new_tokens=n, schedule=schedule))
    lazy = FusedStepDecoder(engine, plain.decision, capacity=n)

    class _EagerGraph:
        def __init__(self, tier: str) -> None:
            self.tier = tier

        def replay(self) -> None:
            with tiers.use(self.tier):
                lazy._step_fn()

    def capture(tier: str) -> None:
        with tiers.use(tier):
            lazy._warm_up()
        lazy.graphs[tier] = _EagerGraph(tier)

    lazy._capture = capture
    engine.use_graphs, engine.graphs = True, {("unused", 0): None}  # engine's own graphs are not used here
    out = lazy.generate(ids, DecodeOptions(max_new_tokens=n, schedule=schedule))
    assert set(lazy.graphs) == set(LADDER) and torch.equal(out, ref)
