"""The trace simulator: same policy as the live engine, a calibrated cost model, static vs adaptive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_adaptive.parallel.cost_model import Calibration, PlanCost
from hf_adaptive.parallel.plans import ModelDims, ParallelPlan, plan_for_strategy
from hf_adaptive.parallel.requests import Request, load_trace, route
from hf_adaptive.parallel.sim_report import compare_plans
from hf_adaptive.parallel.simulator import SimConfig, simulate
from hf_adaptive.policy.parallel_policy import ParallelPolicy, ParallelPolicyConfig

REPO = Path(__file__).resolve().parents[1]
DIMS = ModelDims(num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536)
GB = 2**30


def _cost(prefill_tok, step, per_seq, weights_gb, kv_kb):
    return PlanCost(prefill_ms_base=1.0, prefill_ms_per_token=prefill_tok, decode_ms_base=step,
                    decode_ms_per_seq=per_seq, decode_ms_per_ctx_token=1e-5,
                    weights_bytes_per_device=weights_gb * GB, kv_bytes_per_token_per_device=kv_kb * 1024)


def _calibration(memory_gb=80.0) -> Calibration:
    # Shaped like the usual trade-off: TP lowest latency, DP highest batch throughput, PP splits memory.
    plans = {"tp2": _cost(0.01, 5.0, 0.3, 0.6, 300), "pp2": _cost(0.02, 9.0, 0.3, 0.6, 300),
             "dp2": _cost(0.02, 8.0, 0.3, 1.2, 600)}
    return Calibration(world_size=2, device_memory_bytes=memory_gb * GB, switch_cost_ms=50.0, plans=plans,
                       meta={"dims": DIMS.__dict__, "measured_on": "test"})


def _plan_for(strategy):
    return plan_for_strategy(strategy, 2, DIMS)


def test_cost_model_arithmetic():
    """Guards the cost formula the calibration is fitted to (prefill + G steps over a growing context)."""
    c = PlanCost(2.0, 0.5, 3.0, 1.0, 0.1, 100.0, 10.0)
    assert c.batch_ms(2, 10, 4) == pytest.approx(2 + 0.5 * 20 + 4 * (3 + 2 + 0.1 * 2 * 12))
    assert c.batch_ms(0, 10, 4) == 0.0 and c.memory_bytes(2, 50) == 100 + 10 * 100


def test_first_batches_after_a_layout_change_pay_the_warm_extra():
    """The calibration's warm_batch_extra_ms is added to the first batches at start-up and again after every
    switch, and to nothing else; calibration files without it load as before."""
    import dataclasses

    requests = [Request(str(i), 0.0, 16, prompt_tokens=100) for i in range(64)]  # one backlog: 8 TP batches
    base, warm = _calibration(), dataclasses.replace(_calibration(), warm_batch_extra_ms=(1000.0, 500.0))
    static = [simulate(requests, c, _plan_for, static_plan=ParallelPlan(tp=2)).makespan_s for c in (base, warm)]
    assert static[1] - static[0] == pytest.approx(1.5)
    # adaptive: one chat alone on TP, then a backlog that moves the policy to DP and, once drained, back to TP
    requests = [Request("first", 0.0, 16, prompt_tokens=100)] + [
        Request(str(i), 0.001, 16, prompt_tokens=100) for i in range(64)]
    policy = lambda: ParallelPolicy(ParallelPolicyConfig(cooldown_s=0.0, min_dwell_s=0.0, confirm_s=0.0), initial="tp")  # noqa: E731
    runs = [simulate(requests, c, _plan_for, policy=policy()) for c in (base, warm)]
    assert [s[1:3] for s in runs[0].switches] == [s[1:3] for s in runs[1].switches] == [("tp2", "dp2"),
                                                                                        ("dp2", "tp2")]
    # 1 TP batch at start-up, DP's first 2 (3 DP batches), TP's first 2 again after the backlog drains
    assert runs[1].makespan_s - runs[0].makespan_s == pytest.approx(1.0 + 1.5 + 1.5)
    assert Calibration.load(REPO / "eval/calibration/parallel_h100x2.json").warm_batch_extra_ms == ()


def test_batch_cap_scope_reaches_the_scheduler():
    """SimConfig's cap per device lets static TP2 run a 64-chat backlog in 4 batches of 16 rows (the rows DP2 runs
    over its two replicas) instead of 8 batches of 8; serve.ServeConfig validates the scope as SimConfig does."""
    from hf_adaptive.parallel.serve import ServeConfig

    requests = [Request(str(i), 0.0, 16, prompt_tokens=100) for i in range(64)]
    runs = {per: simulate(requests, _calibration(), _plan_for, static_plan=ParallelPlan(tp=2),
                          config=SimConfig(8, per)) for per in ("replica", "device")}
    assert [len(r.timeline) for r in runs.values()] == [8, 4]
    assert all(len(r.latencies_s) == 64 for r in runs.values())
    assert runs["device"].makespan_s < runs["replica"].makespan_s
    assert ServeConfig(batch_cap_per="device").rows_per_replica(ParallelPlan(tp=2, pp=2)) == 32
    for bad in (lambda: SimConfig(8, "gpu"), lambda: ServeConfig(batch_cap_per="gpu")):
        with pytest.raises(ValueError, match="batch_cap_per"):
            bad()


def test_router_balances_tokens():
    """Guards DP routing: replicas get a balanced token load and no request is dropped or duplicated."""
    reqs = [Request(str(i), 0.0, 10, prompt_ids=[0] * n) for i, n in enumerate([100, 10, 10, 80, 20])]
    parts = route(reqs, 2)
    assert sorted(r.id for p in parts for r in p) == sorted(r.id for r in reqs)
    loads = [sum(r.total_tokens for r in p) for p in parts]
    assert max(loads) - min(loads) <= 40


def test_adaptive_follows_the_mixed_trace_phases():
    """Guards the simulator wiring of the policy: on the committed mixed trace the adaptive run must use DP
    for the offline batch and TP (hybrid on 2 GPUs) for long documents, serve every request, and stay
    deterministic."""
    requests = load_trace(REPO / "eval/traces/mixed.jsonl")
    calib = _calibration()
    cfg = ParallelPolicyConfig()
    a = simulate(requests, calib, _plan_for, policy=ParallelPolicy(cfg))
    b = simulate(requests, calib, _plan_for, policy=ParallelPolicy(cfg))
    assert a.summary(2) == b.summary(2)
    assert len(a.latencies_s) == len(requests) and a.rejected == 0
    targets = [to for _, _, to, _ in a.switches]
    assert "dp2" in targets and "tp2" in targets
    assert 2 <= len(a.switches) <= 12  # adapts, but no thrashing over ~90 s of trace
    static = simulate(requests, calib, _plan_for, static_plan=ParallelPlan(tp=2))
    assert static.switches == [] and len(static.latencies_s) == len(requests)


def test_memory_limit_rejects_or_splits():
    """Guards the memory model: a request whose KV cache cannot fit is rejected, not silently served,
    and a batch that does not fit as a whole is split rather than dropped."""
    calib = _calibration(memory_gb=1.5)  # dp2 holds 1.2 GB of weights: ~0.3 GB left for KV
    docs = [Request(f"d{i}", 0.0, 128, prompt_tokens=3000) for i in range(4)]
    tp = simulate(docs, calib, _plan_for, static_plan=ParallelPlan(tp=2))
    dp = simulate(docs, calib, _plan_for, static_plan=ParallelPlan(dp=2))
    assert tp.rejected == 0 and len(tp.latencies_s) == 4
    assert len(tp.timeline) > 1  # 4 x 3128 tokens x 300 KB > 0.9 GB free: split into several batches
    assert dp.rejected == 4


def test_compare_plans_and_cli_report(tmp_path):
    """Guards the simulate command end to end with the shipped CPU calibration: every calibrated static
    plan plus the adaptive run, written as JSON, Markdown and PNG."""
    import argparse

    from hf_adaptive.commands.simulate import simulate_command_parser

    calib_path = REPO / "eval/calibration/parallel_cpu_gloo_2proc.json"
    calib = Calibration.load(calib_path)
    results = compare_plans(load_trace(REPO / "eval/traces/chat_bursts.jsonl"), calib, DIMS,
                            ParallelPolicyConfig(), SimConfig())
    assert [r.name for r in results] == sorted(calib.plans) + ["adaptive"]
    parser = argparse.ArgumentParser()
    simulate_command_parser(parser.add_subparsers())
    args = parser.parse_args(["simulate", "--trace", str(REPO / "eval/traces/long_documents.jsonl"),
                              "--calibration", str(calib_path), "--out", str(tmp_path)])
    assert args.func(args) == 0
    payload = json.loads((tmp_path / "long_documents.json").read_text())
    assert [r["name"] for r in payload["results"]][-1] == "adaptive"
    assert "NOT a GPU" in payload["calibration_meta"]["measured_on"]
    assert (tmp_path / "long_documents.png").stat().st_size > 0 and (tmp_path / "long_documents.md").exists()


def test_cost_aware_policy_tracks_the_best_static_plan():
    """Guards the calibration -> decision loop: with the cost-aware rule the adaptive run must not be
    clearly slower than the best static plan on single-phase traces (the threshold rule can be)."""
    import dataclasses

    from hf_adaptive.parallel.cost_model import queue_drain_predictor
    from hf_adaptive.policy.parallel_policy import cost_aware_rule

    calib = _calibration()
    rule = cost_aware_rule(queue_drain_predictor(calib, _plan_for, SimConfig().max_batch_per_replica))
    cfg = dataclasses.replace(ParallelPolicyConfig(), rule=rule)
    for trace in ("offline_batch", "long_documents", "chat_bursts"):
        results = compare_plans(load_trace(REPO / f"eval/traces/{trace}.jsonl"), calib, DIMS, cfg)
        best = max(r.summary(2)["throughput_tok_s"] for r in results[:-1])
        assert results[-1].summary(2)["throughput_tok_s"] >= 0.9 * best, trace
