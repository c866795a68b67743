"""Pure-policy and units tables: the ladder's hysteresis, cooldown, demotion choice and byte parsing."""

from __future__ import annotations

import pytest

from hf_adaptive.policy.kv_policy import (FixedBitsPolicy, HysteresisPolicy, KVPolicyConfig, Stage,
                                          choose_demotions)
from hf_adaptive.units import format_bytes, parse_bytes


@pytest.mark.parametrize("text,expected", [
    ("2GiB", 2 * 2**30), ("2 gib", 2 * 2**30), ("1.5GB", 1_500_000_000), ("512MiB", 512 * 2**20),
    ("4096", 4096), ("10kb", 10_000), ("3K", 3 * 1024), (123, 123), ("0.5 TiB", 2**39),
])
def test_parse_bytes_table(text, expected):
    """Guards against unit confusion (GB vs GiB) or case sensitivity in budgets people type."""
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad,error", [("2 gigs", ValueError), ("-1GB", ValueError), (0, ValueError),
                                       ("", ValueError), (1.5, TypeError), (True, TypeError), (None, TypeError)])
def test_parse_bytes_errors_name_parameter(bad, error):
    """Guards against vague errors: the message must name the parameter and show an accepted form."""
    with pytest.raises(error, match="memory_budget") as info:
        parse_bytes(bad)
    assert "GiB" in str(info.value)


def test_format_bytes():
    """Guards against unreadable sizes in error messages and reports."""
    assert format_bytes(3 * 2**20) == "3.00 MiB" and format_bytes(10) == "10 B"


def _walk(policy, fractions):
    return [(d.bits, d.demote_blocks > 0) for d in (policy.decide(f, step) for step, f in enumerate(fractions))]


def test_ladder_table():
    """Guards against wrong thresholds: enter at >= enter_fraction, leave only below exit_fraction."""
    policy = HysteresisPolicy(KVPolicyConfig(cooldown_steps=0))
    fractions = [0.0, 0.69, 0.70, 0.65, 0.59, 0.86, 0.80, 0.96, 0.90, 0.87, 0.74, 0.74, 0.59]
    expected = [(16, False), (16, False), (8, False), (8, False), (16, False), (4, False), (4, False),
                (4, True), (4, True), (4, False), (8, False), (8, False), (16, False)]
    assert _walk(policy, fractions) == expected


def test_escalation_is_immediate_and_can_skip_rungs():
    """Guards against a slow climb while memory runs out: one reading at 0.97 goes straight to demotion."""
    policy = HysteresisPolicy(KVPolicyConfig(cooldown_steps=100))
    assert _walk(policy, [0.1, 0.97]) == [(16, False), (4, True)]


def test_cooldown_delays_stepping_down():
    """Guards against relaxing right after a switch (the cause of thrash)."""
    policy = HysteresisPolicy(KVPolicyConfig(cooldown_steps=3))
    walk = _walk(policy, [0.75, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert walk == [(8, False), (8, False), (8, False), (16, False), (16, False), (16, False)]


@pytest.mark.parametrize("low,high", [(0.69, 0.71), (0.55, 0.75), (0.5, 0.9)])
def test_oscillating_signal_does_not_thrash(low, high):
    """Guards against switching every step when pressure oscillates around a threshold."""
    cooldown, steps = 8, 200
    policy = HysteresisPolicy(KVPolicyConfig(cooldown_steps=cooldown))
    switches = sum(policy.decide(high if s % 2 else low, s).switched for s in range(steps))
    assert switches <= 2 * (steps // cooldown + 1)
    if low >= 0.6:  # never below the exit threshold: exactly one switch (up) and it stays
        assert switches == 1


def test_fixed_bits_policy_ignores_pressure():
    """Guards against evaluations with fixed_bits drifting with the machine's memory."""
    policy = FixedBitsPolicy(4)
    assert {policy.decide(f, i).bits for i, f in enumerate([0.0, 0.99, 5.0])} == {4}
    assert all(policy.decide(5.0, i).demote_blocks == 0 for i in range(3))


@pytest.mark.parametrize("bits,target,k,expected", [
    ([16, 16, 8, 4, 16], 4, 2, [0, 1]), ([16, 16, 8, 4, 16], 4, 10, [0, 1, 2, 4]),
    ([4, 4, 8], 4, 3, [2]), ([16, 8, 16], 8, 5, [0, 2]), ([4, 4], 4, 3, []), ([16], 4, 0, []),
])
def test_choose_demotions_oldest_first(bits, target, k, expected):
    """Guards against demoting recent blocks first, or re-demoting blocks already at the target."""
    assert choose_demotions(bits, target, k) == expected


@pytest.mark.parametrize("kwargs,match", [
    (lambda: dict(stages=(Stage(8, False, 0.0, 0.0),)), "stages\\[0\\]"),
    (lambda: dict(stages=(Stage(16, False, 0.0, 0.0), Stage(3, False, 0.5, 0.4))), "one of"),
    (lambda: dict(stages=(Stage(16, False, 0.0, 0.0), Stage(8, False, 0.5, 0.6))), "exit_fraction"),
    (lambda: dict(stages=(Stage(16, False, 0.0, 0.0), Stage(4, False, 0.8, 0.7), Stage(8, False, 0.9, 0.8))),
     "increase"),
    (lambda: dict(cooldown_steps=-1), "cooldown_steps"),
])
def test_policy_config_validation(kwargs, match):
    """Guards against silently accepting a ladder that cannot work (no hysteresis, rising bits...); a stage
    with bits outside the ladder is refused as it is built."""
    with pytest.raises(ValueError, match=match):
        KVPolicyConfig(**kwargs())
