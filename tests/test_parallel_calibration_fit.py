"""Fitting the simulator's cost model from serving records, and the simulator's admission parity with serving."""

from __future__ import annotations

import random

import pytest

from helpers import make_tiny_model
from hf_adaptive.parallel.calibration_fit import LATENCY_KEYS, batches_of, fit_latency, weights_per_device
from hf_adaptive.parallel.cost_model import Calibration, PlanCost
from hf_adaptive.parallel.plans import ModelDims, ParallelPlan, plan_for_strategy
from hf_adaptive.parallel.requests import Request
from hf_adaptive.parallel.simulator import simulate
from hf_adaptive.policy.parallel_policy import ParallelPolicy, ParallelPolicyConfig


def test_fit_latency_recovers_the_cost_model_from_batch_durations():
    truth = PlanCost(30.0, 0.002, 25.0, 0.8, 1e-4, 0.0, 0.0)
    rng = random.Random(0)
    batches = []
    for _ in range(40):
        rows, width, new = rng.randint(1, 16), rng.randint(50, 8000), rng.randint(8, 128)
        batches.append({"rows": rows, "width": width, "new": new, "seconds": truth.batch_ms(rows, width, new) / 1e3})
    fitted = fit_latency(batches)
    for key in LATENCY_KEYS:
        assert fitted[key] == pytest.approx(getattr(truth, key), rel=1e-6, abs=1e-9), key
    # Durations a shorter batch cannot explain with positive terms: no negative coefficient survives.
    odd = [{"rows": 1, "width": 100 * i, "new": 10, "seconds": 1.0 - 0.01 * i} for i in range(1, 8)]
    assert all(v >= 0 for v in fit_latency(odd).values())


def test_batches_of_groups_records_by_batch_and_routes_replicas():
    def rec(rid, plan, start, end, prompt, new):
        return {"id": rid, "plan": plan, "start_s": start, "finish_s": end, "prompt_tokens": prompt,
                "new_tokens": new}

    run = {"requests": [rec("a", "dp2", 0.0, 2.0, 100, 10), rec("b", "dp2", 0.0, 2.0, 300, 10),
                        rec("c", "dp2", 0.0, 2.0, 50, 10), rec("d", "tp2", 3.0, 9.0, 5000, 64),
                        rec("e", "dp2", 9.5, 10.0, 80, 8), rec("f", "dp2", 10.0, 11.0, 80, 8)]}
    batches = batches_of(run)
    # since_switch counts from every layout change: re-entering DP starts again at 0
    assert [(b["plan"], b["since_switch"]) for b in batches] == [("dp2", 0), ("tp2", 0), ("dp2", 0), ("dp2", 1)]
    first = batches[0]
    # route() puts the 300-token request alone on one replica, the other two together: the busiest share is
    # the one with the most rows x width.
    assert (first["rows"], first["width"], first["new"], first["seconds"]) == (1, 300, 10, 2.0)
    assert batches[1]["width"] == 5000 and batches[1]["seconds"] == 6.0


def test_fit_warm_extra_is_the_median_excess_by_position():
    """The first batches after a layout change are priced as the median of measured minus steady-state time at
    their position (floored at 0); positions with no batch get 0; the lengths must agree."""
    from hf_adaptive.parallel.calibration_fit import fit_warm_extra

    batches = [{"since_switch": k, "seconds": s} for k, s in [(0, 5.0), (1, 3.0), (2, 1.0), (0, 9.0), (1, 2.5),
                                                               (0, 6.0), (3, 1.0)]]
    fitted = [1.0] * len(batches)
    assert fit_warm_extra(batches, fitted, 3) == pytest.approx([5000.0, 1750.0, 0.0])
    assert fit_warm_extra(batches, fitted, 5)[4] == 0.0 and fit_warm_extra(batches, fitted, 0) == []
    with pytest.raises(ValueError, match="fitted_s"):
        fit_warm_extra(batches, fitted[:-1], 3)


def test_weights_per_device_matches_the_real_parameter_bytes():
    model = make_tiny_model("qwen2")
    config = model.config
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights_per_device(config, ParallelPlan(dp=2), 4) == pytest.approx(total, rel=1e-6)
    embed = model.model.embed_tokens.weight.numel() * 4
    head = 0 if config.tie_word_embeddings else model.lm_head.weight.numel() * 4
    layers = total - embed - head - config.hidden_size * 4  # the final norm
    assert weights_per_device(config, ParallelPlan(tp=2), 4) == pytest.approx(embed + head + 4 * config.hidden_size
                                                                              + layers / 2, rel=1e-6)


def test_simulated_adaptive_run_makes_room_like_the_server():
    """A document that does not fit a DP replica (weights + prefill activations over the budget less headroom)
    is refused by static DP and served by the adaptive run after it forces the memory-splitting layout, as
    ``serve.Controller`` does."""
    dims = ModelDims(num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=64)
    gb = 2**30

    def cost(weights_gb):
        return PlanCost(1.0, 1e-3, 5.0, 0.1, 0.0, weights_gb * gb, 1e3, prefill_bytes_per_token_per_device=1e5,
                        mask_bytes_per_token_squared=1.0)

    calib = Calibration(2, 16 * gb, 100.0, {"tp2": cost(6.0), "pp2": cost(6.0), "dp2": cost(12.0)}, {},
                        memory_headroom=0.15)
    requests = [Request(f"c{i}", 0.0, 16, prompt_tokens=100) for i in range(40)]
    requests.append(Request("doc", 0.1, 16, prompt_tokens=20000))  # ~2.4 GB of activations and mask
    plan_for = lambda s: plan_for_strategy(s, 2, dims)  # noqa: E731
    static = simulate(requests, calib, plan_for, static_plan=ParallelPlan(dp=2))
    assert static.rejected == 1 and len(static.latencies_s) == 40
    config = ParallelPolicyConfig(cooldown_s=1e6, min_dwell_s=1e6)  # only a forced switch can leave DP
    adaptive = simulate(requests, calib, plan_for, policy=ParallelPolicy(config, initial="dp"))
    assert adaptive.rejected == 0 and len(adaptive.latencies_s) == 41
    assert [(a, b) for _, a, b, _ in adaptive.switches] == [("dp2", "tp2")]
    assert "does not fit dp2" in adaptive.switches[0][3]


def test_cost_predictor_prices_the_head_of_the_queue():
    """A long document behind a chat backlog must not make DP "unable to serve" the chats ahead of it: DP is
    priced for the chats it drains, one switch, and the document on the fastest plan that holds it; DP is
    refused only once the document is first in the queue. ``head_requests`` prices the next requests only."""
    from hf_adaptive.parallel.cost_model import queue_drain_predictor
    from hf_adaptive.policy.parallel_policy import WorkloadSummary

    dims = ModelDims(num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=64)
    gb = 2**30
    cost = lambda w: PlanCost(1.0, 1e-3, 5.0, 0.1, 0.0, w * gb, 1e3, prefill_bytes_per_token_per_device=1e5)  # noqa: E731
    calib = Calibration(2, 16 * gb, 50.0, {"tp2": cost(6.0), "pp2": cost(6.0), "dp2": cost(12.0)}, {},
                        memory_headroom=0.15)
    plan_for = lambda s: plan_for_strategy(s, 2, dims)  # noqa: E731

    def summary(lens):
        return WorkloadSummary(0, 0, 0, 0.0, 0.0, len(lens), 0.0, tuple(lens), tuple(16 for _ in lens))

    chats_then_doc = [116] * 16 + [20016]  # prompts of 100 and 20000 tokens, 16 new tokens each
    whole = queue_drain_predictor(calib, plan_for, 8)
    head = queue_drain_predictor(calib, plan_for, 8, head_requests=16)
    chats_on_dp = cost(12.0).batch_ms(8, 100, 16)  # 16 chats: 8 rows on each replica, side by side
    doc_on_tp = cost(6.0).batch_ms(1, 20000, 16)  # admission puts the document in a batch of its own
    assert whole("dp", summary(chats_then_doc)) == pytest.approx((chats_on_dp + 50.0 + doc_on_tp) / 1e3)
    tp = (2 * cost(6.0).batch_ms(8, 100, 16) + doc_on_tp) / 1e3
    assert whole("tp", summary(chats_then_doc)) == pytest.approx(tp)
    assert whole("dp", summary(chats_then_doc)) < tp  # two replicas of chats pay for the switch
    assert head("dp", summary(chats_then_doc)) == pytest.approx(chats_on_dp / 1e3)  # the document is 17th
    assert whole("dp", summary([20016] + [116] * 16)) is None  # first in the queue: DP cannot start it
    nothing_holds = Calibration(2, 16 * gb, 100.0, {"dp2": cost(12.0)}, {}, memory_headroom=0.15)
    assert queue_drain_predictor(nothing_holds, plan_for, 8)("dp", summary(chats_then_doc)) is None
    with pytest.raises(ValueError, match="head_requests"):
        queue_drain_predictor(calib, plan_for, 8, head_requests=-1)
    # a cap per device lets TP batch the 16 chats at once, as DP does over its two replicas
    per_device = queue_drain_predictor(calib, plan_for, 8, batch_cap_per="device")
    assert per_device("tp", summary(chats_then_doc)) == pytest.approx((cost(6.0).batch_ms(16, 100, 16) + doc_on_tp)
                                                                       / 1e3)
    assert per_device("dp", summary(chats_then_doc)) == pytest.approx(whole("dp", summary(chats_then_doc)))
    with pytest.raises(ValueError, match="--max-batch-per"):
        queue_drain_predictor(calib, plan_for, 8, batch_cap_per="gpu")
