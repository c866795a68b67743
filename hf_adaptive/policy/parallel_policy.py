"""Which parallel strategy (TP, PP, DP or hybrid TP x PP) the current workload wants.

Contract: pure decisions over plain numbers. Knows nothing about torch, devices or processes; the time
comes in with the signals (``now_s``), so a replayed trace and a live server make the same decisions.

The threshold rule (thresholds in ``ParallelPolicyConfig``):
    long context (over the window, half of all tokens in requests > 1024 tokens long) or memory > 0.8
        -> hybrid TP+PP,
        and pipeline (PP) when memory > 0.9;
    > 32 concurrent (running or queued) requests shorter than 256 tokens -> data parallel (DP);
    otherwise -> tensor parallel (TP).
Every threshold has an enter and an exit value (hysteresis): a strategy is entered past the enter value
and left only past the exit value. ``ParallelPolicy`` adds a cooldown between switches, a minimum dwell
in a strategy and a confirmation period, and logs every switch with its reason.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hf_adaptive.validation import check_number, check_type

logger = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("tp", "pp", "dp", "hybrid")


@dataclass(frozen=True)
class WorkloadSignals:
    """One observation of the workload.

    Args:
        now_s: monotonic time of the observation, seconds.
        seq_lens: total tokens (prompt + tokens to generate) of each request that arrived since the
            previous observation (each request is counted once; the window keeps them ``window_s``).
        memory_fraction: used / total accelerator memory, one value per device, each in [0, 1].
        concurrent_requests: requests running plus queued.
        queue_seq_lens: total tokens of each request running or queued now (live, not windowed).
        queue_new_tokens: tokens still to generate of those requests, same order (for cost-aware rules).
        arrival_rate_per_s: requests per second over the recent past.
    """

    now_s: float
    seq_lens: tuple[int, ...] = ()
    memory_fraction: tuple[float, ...] = ()
    concurrent_requests: int = 0
    arrival_rate_per_s: float = 0.0
    queue_seq_lens: tuple[int, ...] = ()
    queue_new_tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class WorkloadSummary:
    """A window of signals reduced to the numbers a rule looks at."""

    seq_len_p50: float
    seq_len_p90: float
    seq_len_max: int
    token_weighted_p50: float  # half of all tokens sit in requests at least this long
    memory_fraction_max: float
    concurrent_requests: int
    arrival_rate_per_s: float
    queue_seq_lens: tuple[int, ...] = ()
    queue_new_tokens: tuple[int, ...] = ()


def token_weighted_percentile(lengths: Sequence[int], q: float) -> float:
    """The length L such that ``q`` % of all tokens belong to requests no longer than L; 0.0 for none.

    Request-weighted percentiles let a burst of short chats hide a stream of long documents that holds
    most of the tokens (and so most of the compute and KV memory); weighting by tokens does not.
    """
    total = sum(lengths)
    if total <= 0:
        return 0.0
    seen = 0
    for n in sorted(lengths):
        seen += n
        if seen >= total * q / 100.0:
            return float(n)
    return float(max(lengths))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (0..100) of ``values``; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class SignalWindow:
    """Sequence lengths seen over the last ``window_s`` seconds, plus the latest live signals."""

    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0 seconds, got {window_s!r}; pass e.g. 30.0")
        self.window_s = window_s
        self._lens: deque[tuple[float, int]] = deque()
        self._latest: WorkloadSignals | None = None

    def add(self, signals: WorkloadSignals) -> None:
        self._latest = signals
        self._lens.extend((signals.now_s, n) for n in signals.seq_lens)
        while self._lens and self._lens[0][0] < signals.now_s - self.window_s:
            self._lens.popleft()

    def summary(self) -> WorkloadSummary:
        latest = self._latest or WorkloadSignals(now_s=0.0)
        lens = [n for _, n in self._lens]
        # Live signals (memory, concurrency) are not windowed: memory pressure must act on the latest value.
        return WorkloadSummary(
            seq_len_p50=percentile(lens, 50), seq_len_p90=percentile(lens, 90),
            seq_len_max=max(lens, default=0), token_weighted_p50=token_weighted_percentile(lens, 50),
            memory_fraction_max=max(latest.memory_fraction, default=0.0),
            concurrent_requests=latest.concurrent_requests, arrival_rate_per_s=latest.arrival_rate_per_s,
            queue_seq_lens=latest.queue_seq_lens, queue_new_tokens=latest.queue_new_tokens,
        )


@dataclass(frozen=True)
class Band:
    """A hysteresis band: cross ``enter`` to take a strategy, cross back past ``exit`` to leave it."""

    enter: float
    exit: float

    def __post_init__(self) -> None:
        for name in ("enter", "exit"):  # a NaN threshold compares False both ways: the band would never act
            check_number(getattr(self, name), f"Band.{name}", fix="Band(enter=0.8, exit=0.7)")

    def limit(self, active: bool) -> float:
        """The threshold in force: ``exit`` while the strategy is active, else ``enter``."""
        return self.exit if active else self.enter

    def over(self, value: float, active: bool) -> bool:
        """Whether ``value`` is past an upper threshold (``exit`` applies while the strategy is active)."""
        return value > self.limit(active)

    def under(self, value: float, active: bool) -> bool:
        """Whether ``value`` is below a lower threshold (``exit`` applies while the strategy is active)."""
        return value < self.limit(active)


Rule = Callable[[WorkloadSummary, str, "ParallelPolicyConfig"], tuple[str, str]]


def length_signal(summary: WorkloadSummary, config: ParallelPolicyConfig) -> float:
    """The token-weighted median request length the rule compares with ``long_context_tokens``: of the
    requests that arrived within the window, or (``queue_head_requests`` > 0) of the next requests in the
    FIFO queue, i.e. the work the next batches will run; an empty queue falls back to the window."""
    head = summary.queue_seq_lens[:config.queue_head_requests] if config.queue_head_requests else ()
    return token_weighted_percentile(head, 50) if head else summary.token_weighted_p50


def threshold_rule(summary: WorkloadSummary, current: str, config: ParallelPolicyConfig) -> tuple[str, str]:
    """The threshold rule with hysteresis. Returns ``(strategy, reason)``."""
    model_split = current in ("hybrid", "pp")
    if config.pipeline_memory.over(summary.memory_fraction_max, current == "pp"):
        limit = config.pipeline_memory.limit(current == "pp")
        return "pp", f"memory {summary.memory_fraction_max:.2f} > {limit} (pipeline)"
    length = length_signal(summary, config)
    long_ctx = config.long_context_tokens.over(length, model_split)
    high_mem = config.hybrid_memory.over(summary.memory_fraction_max, model_split)
    if long_ctx or high_mem:
        where = f"of the next {config.queue_head_requests} queued" if config.queue_head_requests else "arrived"
        why = (f"token-weighted median length ({where}) {length:.0f} > "
               f"{config.long_context_tokens.limit(model_split):.0f} tokens"
               if long_ctx else f"memory {summary.memory_fraction_max:.2f} > {config.hybrid_memory.limit(model_split)}")
        return "hybrid", why
    is_dp = current == "dp"
    n_short = sum(1 for n in summary.queue_seq_lens if config.dp_short_tokens.under(n, is_dp))
    if config.dp_concurrency.over(n_short, is_dp):
        return "dp", f"{n_short} concurrent requests < {config.dp_short_tokens.limit(is_dp):.0f} tokens"
    return "tp", "default: moderate context and concurrency"


def cost_aware_rule(predict_s: Callable[[str, WorkloadSummary], float | None],
                    margin_fraction: float = 0.15) -> Rule:
    """A rule that picks the strategy predicted to drain the live queue fastest.

    ``predict_s(strategy, summary)`` returns predicted seconds (None: the strategy cannot serve it), e.g.
    from a calibrated cost model. Memory pressure still decides first (the threshold rule's memory bands),
    and a challenger must beat the current strategy by ``margin_fraction`` (hysteresis on cost).
    """
    if not 0 <= margin_fraction < 1:
        raise ValueError(f"margin_fraction must be in [0, 1), got {margin_fraction!r}; e.g. 0.15")

    def rule(summary: WorkloadSummary, current: str, config: ParallelPolicyConfig) -> tuple[str, str]:
        split = current in ("hybrid", "pp")
        if (config.pipeline_memory.over(summary.memory_fraction_max, current == "pp")
                or config.hybrid_memory.over(summary.memory_fraction_max, split) or not summary.queue_seq_lens):
            return threshold_rule(summary, current, config)
        costs = {s: c for s in STRATEGIES if (c := predict_s(s, summary)) is not None}
        if not costs:
            return threshold_rule(summary, current, config)
        best = min(costs, key=costs.get)
        now = costs.get(current)
        if now is not None and costs[best] >= now * (1 - margin_fraction):
            return current, f"predicted {now:.2f}s on {current}; best {best} {costs[best]:.2f}s is within margin"
        stay = f"{now:.2f}s on {current}" if now is not None else f"none on {current} (cannot hold the next request, or not calibrated)"
        return best, f"predicted {costs[best]:.2f}s on {best} vs {stay}"

    return rule


@dataclass(frozen=True)
class ParallelPolicyConfig:
    """Thresholds and timing of the parallelism policy.

    Args:
        long_context_tokens: band on the token-weighted median request length (tokens) for hybrid TP+PP.
        hybrid_memory: memory fraction band for hybrid TP+PP.
        pipeline_memory: memory fraction band for pure PP (overrides dwell and confirmation).
        dp_concurrency: band on the number of concurrent short requests for DP.
        dp_short_tokens: what counts as a short request for DP, in tokens (a lower band).
        cooldown_s: minimum time between two switches, no exceptions.
        min_dwell_s: minimum time in a strategy before leaving it (memory pressure is exempt).
        confirm_s: a new strategy must be proposed this long without a break (memory pressure exempt).
        window_s: window over which sequence lengths are summarised.
        queue_head_requests: 0 (default): the length signal is the window of arrivals; N > 0: the next N
            queued requests. A serving engine that drains a FIFO queue wants the latter: when a stream of long
            documents starts arriving behind a backlog of short chats, the arrivals say "long" while the next
            batches are still chats.
        rule: ``(summary, current, config) -> (strategy, reason)``; pluggable.
    """

    long_context_tokens: Band = Band(enter=1024, exit=768)
    hybrid_memory: Band = Band(enter=0.80, exit=0.70)
    pipeline_memory: Band = Band(enter=0.90, exit=0.85)
    dp_concurrency: Band = Band(enter=32, exit=24)
    dp_short_tokens: Band = Band(enter=256, exit=320)
    cooldown_s: float = 5.0
    min_dwell_s: float = 10.0
    confirm_s: float = 2.0
    window_s: float = 10.0
    queue_head_requests: int = 0
    rule: Rule = threshold_rule

    def __post_init__(self) -> None:
        for name in ("cooldown_s", "min_dwell_s", "confirm_s", "window_s"):
            check_number(getattr(self, name), name, minimum=0.0, min_open=name == "window_s",
                         fix=f"{name}=5.0 (seconds)")
        for name in ("long_context_tokens", "hybrid_memory", "pipeline_memory", "dp_concurrency", "dp_short_tokens"):
            check_type(getattr(self, name), name, Band, f"{name}=Band(enter=..., exit=...)")
        for name in ("long_context_tokens", "hybrid_memory", "pipeline_memory", "dp_concurrency"):
            band = getattr(self, name)
            if band.exit > band.enter:
                raise ValueError(f"{name} is an upper band: exit ({band.exit}) must be <= enter ({band.enter}); "
                                 f"swap them")
        if self.dp_short_tokens.exit < self.dp_short_tokens.enter:
            raise ValueError(f"dp_short_tokens is a lower band: exit ({self.dp_short_tokens.exit}) must be >= "
                             f"enter ({self.dp_short_tokens.enter}); swap them")
        check_number(self.queue_head_requests, "queue_head_requests", minimum=0, integer=True,
                     fix="queue_head_requests=0 (0: use the arrival window)")
        if not callable(self.rule):
            raise TypeError(f"rule must be callable (summary, current, config) -> (strategy, reason), "
                            f"got {type(self.rule).__name__}")


@dataclass(frozen=True)
class SwitchEvent:
    """One switch of strategy, with the numbers that caused it."""

    time_s: float
    from_strategy: str
    to_strategy: str
    reason: str
    summary: WorkloadSummary


@dataclass
class ParallelPolicy:
    """Stateful wrapper around a rule: windowing, cooldown, minimum dwell, confirmation, switch log.

    ``observe(signals)`` returns the strategy to run now; ``history`` lists every switch.
    """

    config: ParallelPolicyConfig = field(default_factory=ParallelPolicyConfig)
    initial: str = "tp"
    history: list[SwitchEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_strategy("initial", self.initial)
        self.current = self.initial
        self._window = SignalWindow(self.config.window_s)
        self._entered_s: float | None = None
        self._last_switch_s = -math.inf
        self._candidate: tuple[str, float] | None = None  # (strategy, first time proposed)

    def observe(self, signals: WorkloadSignals) -> str:
        """Feed one observation; return the strategy to use from now on."""
        now = signals.now_s
        first = self._entered_s is None
        if first:
            self._entered_s = now
        self._window.add(signals)
        summary = self._window.summary()
        proposed, reason = self.config.rule(summary, self.current, self.config)
        check_strategy("rule result", proposed)
        if proposed == self.current:
            self._candidate = None
            return self.current
        if self._candidate is None or self._candidate[0] != proposed:
            self._candidate = (proposed, now)
        # The first observation places the initial layout freely: it was not chosen for any workload yet.
        if first or self._may_switch(proposed, now):
            self._switch(proposed, reason, summary, now)
        return self.current

    def force(self, strategy: str, reason: str, now_s: float) -> None:
        """Take ``strategy`` now, past cooldown, dwell and confirmation, logged like any switch: for work the
        current layout cannot run at all (a queued request that does not fit its memory)."""
        check_strategy("strategy", strategy)
        if self._entered_s is None:
            self._entered_s = now_s
        if strategy != self.current:
            self._switch(strategy, reason, self._window.summary(), now_s)

    def _may_switch(self, proposed: str, now: float) -> bool:
        if now - self._last_switch_s < self.config.cooldown_s:
            return False
        # Memory pressure cannot wait for dwell or confirmation: the alternative is running out of memory.
        if proposed == "pp":
            return True
        dwelt = now - self._entered_s >= self.config.min_dwell_s
        confirmed = now - self._candidate[1] >= self.config.confirm_s
        return dwelt and confirmed

    def _switch(self, proposed: str, reason: str, summary: WorkloadSummary, now: float) -> None:
        self.history.append(SwitchEvent(now, self.current, proposed, reason, summary))
        logger.info("parallel policy: %s -> %s at %.2fs (%s)", self.current, proposed, now, reason)
        self.current, self._entered_s, self._last_switch_s, self._candidate = proposed, now, now, None


def check_strategy(name: str, value: str) -> None:
    if value not in STRATEGIES:
        raise ValueError(f"{name} must be one of {STRATEGIES}, got {value!r}")
