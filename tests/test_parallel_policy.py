"""Table tests of the parallelism policy (pure; no torch, no processes)."""

from __future__ import annotations

import math

import pytest

from hf_adaptive.policy.parallel_policy import (
    Band,
    ParallelPolicy,
    ParallelPolicyConfig,
    SignalWindow,
    WorkloadSignals,
    WorkloadSummary,
    threshold_rule,
    percentile,
    token_weighted_percentile,
)

CFG = ParallelPolicyConfig()


def summary(p90=100.0, mem=0.1, conc=4, max_len=None):
    """``conc`` requests in flight: one of ``max_len`` tokens (default p90), the rest of 100 tokens."""
    lens = (int(max_len or p90),) + (100,) * (conc - 1)
    return WorkloadSummary(seq_len_p50=p90, seq_len_p90=p90, seq_len_max=max(lens), token_weighted_p50=p90,
                           memory_fraction_max=mem,
                           concurrent_requests=conc, arrival_rate_per_s=1.0, queue_seq_lens=lens)


@pytest.mark.parametrize("s, current, expected", [
    (summary(p90=100), "tp", "tp"),                       # moderate: TP
    (summary(p90=2000), "tp", "hybrid"),                  # long context
    (summary(p90=1025), "tp", "hybrid"),                  # just past the enter threshold
    (summary(p90=1024), "tp", "tp"),                      # at the threshold: not past it
    (summary(mem=0.85), "tp", "hybrid"),                  # memory > 0.8
    (summary(mem=0.95), "tp", "pp"),                      # memory > 0.9: pipeline
    (summary(mem=0.95, p90=3000), "hybrid", "pp"),        # memory beats context
    (summary(conc=40, p90=100, max_len=200), "tp", "dp"),  # many short requests
    (summary(conc=33, p90=100, max_len=300), "tp", "tp"),  # 33 in flight, but only 32 of them short
    (summary(conc=33, p90=100, max_len=200), "tp", "dp"),  # 33 short ones
    (summary(conc=32, p90=100, max_len=200), "tp", "tp"),  # exactly 32 is not > 32
    (summary(conc=40, p90=2000, max_len=3000), "tp", "hybrid"),  # many long ones: hybrid, not DP
])
def test_threshold_rule_table(s, current, expected):
    """Guards the threshold rule's decision table: each workload maps to the strategy its thresholds name."""
    assert threshold_rule(s, current, CFG)[0] == expected


@pytest.mark.parametrize("s, current, expected", [
    (summary(p90=900), "hybrid", "hybrid"),   # below enter (1024) but above exit (768): stay
    (summary(p90=900), "tp", "tp"),           # same value does not enter from TP
    (summary(p90=700), "hybrid", "tp"),       # below exit: leave
    (summary(mem=0.75), "hybrid", "hybrid"),  # memory inside the band
    (summary(mem=0.88), "pp", "pp"),          # pipeline exit is 0.85
    (summary(mem=0.84), "pp", "hybrid"),      # out of PP band, still in hybrid band
    (summary(conc=28, max_len=200), "dp", "dp"),   # exit is 24 concurrent
    (summary(conc=20, max_len=200), "dp", "tp"),
    (summary(conc=26, max_len=300), "dp", "dp"),   # short band exit is 320 tokens: 300 still counts
    (summary(conc=26, max_len=300), "tp", "tp"),   # ... but does not count on entry (25 short < 32)
])
def test_hysteresis_bands(s, current, expected):
    """Guards against single-threshold flapping: enter and exit thresholds must differ per strategy."""
    assert threshold_rule(s, current, CFG)[0] == expected


def test_percentile_and_window():
    """Guards the window against counting expired requests (stale long docs would pin hybrid), and the
    token weighting against a burst of short chats hiding the long documents that hold most tokens."""
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 90) == 0.0
    lens = [150] * 96 + [2600] * 6  # 14400 chat tokens, 15600 document tokens
    assert percentile(lens, 90) == 150 and token_weighted_percentile(lens, 50) == 2600
    assert token_weighted_percentile([], 50) == 0.0
    w = SignalWindow(window_s=10)
    w.add(WorkloadSignals(now_s=0, seq_lens=(5000,)))
    w.add(WorkloadSignals(now_s=5, seq_lens=(100, 100)))
    assert w.summary().seq_len_max == 5000
    w.add(WorkloadSignals(now_s=11, seq_lens=(100,)))
    assert w.summary().seq_len_max == 100


def oscillating(period_s: float, duration_s: float, step_s: float = 0.5):
    """Seq length alternating between short and long every ``period_s`` seconds."""
    t = 0.0
    while t < duration_s:
        long = math.floor(t / period_s) % 2 == 1
        yield WorkloadSignals(now_s=t, seq_lens=(3000,) if long else (100,), memory_fraction=(0.3,),
                              concurrent_requests=4)
        t += step_s


def test_oscillating_signal_does_not_thrash():
    """Guards against thrashing: a workload flipping every 1 s must not cause a switch every second."""
    cfg = ParallelPolicyConfig(window_s=0.1, cooldown_s=5.0, min_dwell_s=10.0, confirm_s=2.0)
    policy = ParallelPolicy(cfg)
    for s in oscillating(period_s=1.0, duration_s=120):
        policy.observe(s)
    assert len(policy.history) <= 120 / cfg.min_dwell_s
    gaps = [b.time_s - a.time_s for a, b in zip(policy.history, policy.history[1:])]
    assert all(g >= cfg.min_dwell_s for g in gaps)
    # Without dwell/cooldown/confirmation the same signal switches on most flips: the guards matter.
    bare = ParallelPolicy(ParallelPolicyConfig(window_s=0.1, cooldown_s=0, min_dwell_s=0, confirm_s=0))
    for s in oscillating(period_s=1.0, duration_s=120):
        bare.observe(s)
    assert len(bare.history) > 5 * max(1, len(policy.history))
    # A slower flip (4 s, longer than confirm_s) does switch, but never faster than the dwell time allows.
    slow = ParallelPolicy(cfg)
    for s in oscillating(period_s=4.0, duration_s=120):
        slow.observe(s)
    gaps = [b.time_s - a.time_s for a, b in zip(slow.history, slow.history[1:])]
    assert len(slow.history) >= 2 and all(g >= cfg.min_dwell_s for g in gaps)


def test_sustained_change_switches_and_logs_reason():
    """Guards against a policy so sticky it never adapts, and against switches with no recorded reason."""
    policy = ParallelPolicy(ParallelPolicyConfig(window_s=2.0, cooldown_s=1, min_dwell_s=3, confirm_s=1))
    for t in range(0, 30):
        policy.observe(WorkloadSignals(now_s=float(t), seq_lens=(4000,) if t >= 10 else (50,)))
    assert [(e.from_strategy, e.to_strategy) for e in policy.history] == [("tp", "hybrid")]
    event = policy.history[0]
    assert 11 <= event.time_s <= 13 and "token-weighted median" in event.reason
    assert event.summary.token_weighted_p50 > 1024


def test_memory_pressure_bypasses_dwell_but_not_cooldown():
    """Guards against OOM while waiting out dwell: PP pressure must switch at once once cooldown allows."""
    policy = ParallelPolicy(ParallelPolicyConfig(cooldown_s=2, min_dwell_s=100, confirm_s=50))
    assert policy.observe(WorkloadSignals(now_s=0.0, memory_fraction=(0.2, 0.3))) == "tp"
    assert policy.observe(WorkloadSignals(now_s=1.0, memory_fraction=(0.2, 0.95))) == "pp"
    # 0.5 s later a hybrid-band memory reading cannot switch (cooldown), nor later (dwell 100 s).
    assert policy.observe(WorkloadSignals(now_s=1.5, memory_fraction=(0.82,))) == "pp"
    assert policy.observe(WorkloadSignals(now_s=20.0, memory_fraction=(0.82,))) == "pp"


def test_pluggable_rule_and_config_errors():
    """Guards the extension point (a custom rule is used) and errors that name the parameter and fix."""
    policy = ParallelPolicy(ParallelPolicyConfig(rule=lambda s, cur, c: ("dp", "always dp"), min_dwell_s=0,
                                                 confirm_s=0, cooldown_s=0))
    assert policy.observe(WorkloadSignals(now_s=0.0)) == "dp"
    with pytest.raises(ValueError, match="cooldown_s"):
        ParallelPolicyConfig(cooldown_s=-1)
    with pytest.raises(ValueError, match="exit .* must be <= enter"):
        ParallelPolicyConfig(long_context_tokens=Band(enter=100, exit=200))
    with pytest.raises(ValueError, match="must be one of"):
        ParallelPolicy(initial="zero")
    bad = ParallelPolicy(ParallelPolicyConfig(rule=lambda s, cur, c: ("fsdp", "?")))
    with pytest.raises(ValueError, match="rule result"):
        bad.observe(WorkloadSignals(now_s=0.0))


def test_policy_module_is_pure():
    """Guards the policy/mechanism split: the policy must not import torch (it runs in the simulator)."""
    import subprocess
    import sys

    code = "import sys, hf_adaptive.policy.parallel_policy, hf_adaptive.parallel.plans; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cost_aware_rule():
    """Guards the cost-aware rule: it takes the fastest predicted strategy only past its margin, leaves
    memory pressure to the memory bands, and falls back to the threshold rule when nothing is predicted."""
    from hf_adaptive.policy.parallel_policy import cost_aware_rule

    costs = {"tp": 10.0, "pp": 12.0, "dp": 8.0, "hybrid": None}
    rule = cost_aware_rule(lambda s, summ: costs[s], margin_fraction=0.15)
    queued = summary(conc=4)
    assert rule(queued, "tp", CFG)[0] == "dp"            # 8 < 10 * 0.85
    costs["dp"] = 9.0
    assert rule(queued, "tp", CFG)[0] == "tp"            # 9 is within 15% of 10: stay
    assert rule(queued, "hybrid", CFG)[0] == "dp"        # current unpredictable: take the best
    assert rule(summary(conc=4, mem=0.95), "tp", CFG)[0] == "pp"  # memory first
    none = cost_aware_rule(lambda s, summ: None)
    assert none(summary(p90=3000), "tp", CFG)[0] == "hybrid"
    with pytest.raises(ValueError, match="margin_fraction"):
        cost_aware_rule(lambda s, summ: 1.0, margin_fraction=1.5)


def test_first_observation_places_freely():
    """Guards against a stuck start: the initial layout is not a workload decision, so the first
    observation may switch at once (a batch that fits inside min_dwell_s would otherwise never adapt)."""
    policy = ParallelPolicy(ParallelPolicyConfig(min_dwell_s=100, confirm_s=50, cooldown_s=50))
    lens = (100,) * 40
    assert policy.observe(WorkloadSignals(now_s=0.0, seq_lens=lens, queue_seq_lens=lens, concurrent_requests=40)) == "dp"
    assert policy.observe(WorkloadSignals(now_s=1.0, seq_lens=(3000,), queue_seq_lens=(3000,))) == "dp"


def test_force_bypasses_cooldown_and_dwell_and_is_logged():
    """Guards the make-room path: when a queued request cannot fit the current layout, the engine forces a
    memory-splitting strategy at once (no cooldown, dwell or confirmation to wait for), and the switch is logged
    with its reason like any other; forcing the current strategy is a no-op."""
    policy = ParallelPolicy(ParallelPolicyConfig(cooldown_s=100.0, min_dwell_s=100.0, confirm_s=100.0), initial="dp")
    policy.observe(WorkloadSignals(now_s=0.0, seq_lens=(100,) * 40, concurrent_requests=40,
                                   queue_seq_lens=(100,) * 40))
    n = len(policy.history)
    policy.force("hybrid", "request r1 needs ~3 GiB per device on dp2", 0.5)
    assert policy.current == "hybrid" and len(policy.history) == n + 1
    assert policy.history[-1].reason.startswith("request r1") and policy.history[-1].time_s == 0.5
    policy.force("hybrid", "again", 0.6)
    assert len(policy.history) == n + 1
    with pytest.raises(ValueError, match="strategy must be one of"):
        policy.force("zp", "bad", 0.7)
