"""Replay a trace through the parallelism policy against a calibrated cost model, in virtual time.

Contract: pure and deterministic (no torch, no clocks). The adaptive run uses the very same
``ParallelPolicy`` and ``plan_for_strategy`` as the live controller; static runs pin one plan. The
scheduler mirrors ``serve.Controller``: FIFO, the same batch cap per replica (``SimConfig``), DP batches routed
by ``requests.route``, batches admitted by memory with ``capacity.admit`` (the calibration's per-plan
``replica_memory`` and ``free_bytes``), a head request that fits no batch makes the adaptive run force a
memory-splitting layout (hybrid, then PP) and a static run refuse it, switches only between batches and
each costs ``switch_cost_ms``, and the first batches after a layout change (start-up included) take
``warm_batch_extra_ms`` longer each, where the calibration measured that.

Utilisation is the share of device-time doing useful work: busy time over the makespan, times the
share of devices a batch keeps busy (PP without micro-batching keeps 1 of ``pp`` stages busy; DP keeps
only the replicas that got requests).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice

from hf_adaptive.parallel.capacity import admit, replica_rows
from hf_adaptive.parallel.cost_model import Calibration, batch_cost
from hf_adaptive.parallel.plans import ParallelPlan
from hf_adaptive.parallel.requests import Request, route
from hf_adaptive.parallel.trace_file import MAX_TOKENS
from hf_adaptive.policy.parallel_policy import ParallelPolicy, WorkloadSignals, percentile
from hf_adaptive.validation import FieldTypeError, FieldValueError, check_number, check_type, located, show


def prompt_len(request: Request) -> int:
    """Prompt tokens of a request (``prompt_tokens``, token ids, or ~4/3 tokens per word of text)."""
    if request.prompt_ids:
        return len(request.prompt_ids)
    if request.prompt_tokens is not None:
        return int(request.prompt_tokens)
    return max(1, len((request.prompt or "").split()) * 4 // 3)


def check_request(request: Request) -> None:
    """Refuse what would stall or corrupt virtual time: a NaN or infinite arrival (``max(now, nan)`` never
    advances), negative times, and token counts below 1 (``trace_file`` gives the same rules with file lines)."""
    check_type(request, "request", Request, "Request(id, arrival_s, max_new_tokens, prompt_tokens=...)")
    where = f"request {show(request.id)}: "
    try:
        check_number(request.arrival_s, "arrival_s", minimum=0.0, fix="arrival_s=0.5 (seconds)")
        check_number(request.max_new_tokens, "max_new_tokens", minimum=1, maximum=MAX_TOKENS, integer=True,
                     fix="max_new_tokens=32")
        if not request.prompt_ids and request.prompt is None:
            check_number(request.prompt_tokens, "prompt_tokens", minimum=1, maximum=MAX_TOKENS, integer=True,
                         fix="prompt_tokens=128")
    except (FieldValueError, FieldTypeError) as err:
        raise located(err, where) from None


@dataclass
class SimResult:
    """One replay: latencies, throughput, utilisation, switches and the plan timeline."""

    name: str
    latencies_s: list[float] = field(default_factory=list)
    new_tokens: int = 0
    makespan_s: float = 0.0
    busy_device_s: float = 0.0
    rejected: int = 0
    switches: list[tuple[float, str, str, str]] = field(default_factory=list)
    timeline: list[tuple[float, str, float]] = field(default_factory=list)  # (time, plan, memory fraction)

    def summary(self, world_size: int) -> dict:
        span = max(self.makespan_s, 1e-9)
        return {"name": self.name, "requests": len(self.latencies_s), "rejected": self.rejected,
                "throughput_tok_s": self.new_tokens / span, "latency_p50_s": percentile(self.latencies_s, 50),
                "latency_p99_s": percentile(self.latencies_s, 99), "makespan_s": self.makespan_s,
                "utilisation": self.busy_device_s / (span * world_size), "switches": len(self.switches)}


@dataclass(frozen=True)
class SimConfig:
    """The scheduler's batch cap, as ``serve.ServeConfig``'s (``capacity.replica_rows``)."""

    max_batch_per_replica: int = 8
    batch_cap_per: str = "replica"

    def __post_init__(self) -> None:
        replica_rows(ParallelPlan(), self.max_batch_per_replica, self.batch_cap_per)  # validates both

    def rows_per_replica(self, plan: ParallelPlan) -> int:
        return replica_rows(plan, self.max_batch_per_replica, self.batch_cap_per)


def simulate(requests: Sequence[Request], calib: Calibration, plan_for: Callable[[str], ParallelPlan],
             policy: ParallelPolicy | None = None, static_plan: ParallelPlan | None = None,
             config: SimConfig = SimConfig(), name: str = "") -> SimResult:
    """Replay ``requests`` (sorted by arrival) with the adaptive ``policy`` or a fixed ``static_plan``."""
    if (policy is None) == (static_plan is None):
        raise ValueError("give exactly one of policy (adaptive) or static_plan (fixed layout)")
    check_type(calib, "calib", Calibration, "Calibration.load(path)")
    for r in requests:
        check_request(r)
    result = SimResult(name or (static_plan.name if static_plan else "adaptive"))
    pending = deque(sorted(requests, key=lambda r: r.arrival_s))
    queue: deque[Request] = deque()
    plan = static_plan or plan_for(policy.current)
    now, memory, arrivals = 0.0, 0.0, deque(maxlen=64)
    since_switch = 0  # batches run on the current layout since the start or the last switch
    room_tried: dict[str, set[str]] = {}  # head request id -> plans tried to fit it (as serve.Controller)

    def switch(new_plan: ParallelPlan, reason: str) -> None:
        nonlocal now, plan, since_switch
        result.switches.append((now, plan.name, new_plan.name, reason))
        now += calib.switch_cost_ms / 1e3
        plan, since_switch = new_plan, 0

    while pending or queue:
        if not queue:
            now = max(now, pending[0].arrival_s)
        new_lens = []
        while pending and pending[0].arrival_s <= now:
            r = pending.popleft()
            queue.append(r)
            arrivals.append(r.arrival_s)
            new_lens.append(prompt_len(r) + r.max_new_tokens)
        if policy is not None and queue[0].id not in room_tried:
            rate = sum(1 for t in arrivals if t >= now - 5.0) / 5.0
            signals = WorkloadSignals(now, tuple(new_lens), (memory,), len(queue), rate,
                                      tuple(prompt_len(r) + r.max_new_tokens for r in queue),
                                      tuple(r.max_new_tokens for r in queue))
            new_plan = plan_for(policy.observe(signals))
            if new_plan != plan:
                switch(new_plan, policy.history[-1].reason if policy.history else "")
        rows = config.rows_per_replica(plan)
        head_rows = list(islice(queue, rows * plan.dp))
        take, fits = admit(head_rows, plan, calib.free_bytes(plan.name), calib.cost(plan.name).replica_memory(),
                           rows, route, prompt_len)
        if not fits:
            head = queue[0]
            tried = room_tried.setdefault(head.id, {plan.name})
            room = next((s for s in ("hybrid", "pp") if policy is not None and plan_for(s).name not in tried), None)
            if room is None:
                queue.popleft()
                room_tried.pop(head.id, None)
                result.rejected += 1
                continue
            tried.add(plan_for(room).name)
            reason = f"request {head.id} does not fit {plan.name}: trying {plan_for(room).name}"
            policy.force(room, reason, now)
            switch(plan_for(room), reason)
            continue
        batch = [queue.popleft() for _ in range(take)]
        for r in batch:
            room_tried.pop(r.id, None)
        warm = calib.warm_batch_extra_ms
        extra_s = warm[since_switch] / 1e3 if since_switch < len(warm) else 0.0
        now, memory = _serve_batch(batch, plan, calib, now, result, extra_s)
        since_switch += 1
    result.makespan_s = now - (min(r.arrival_s for r in requests) if requests else 0.0)
    return result


def _serve_batch(batch: list[Request], plan: ParallelPlan, calib: Calibration, now: float,
                 result: SimResult, extra_s: float) -> tuple[float, float]:
    seconds, memory, busy = batch_cost(calib, plan, batch, prompt_len)
    seconds += extra_s  # a first batch after a layout change (calibration's warm_batch_extra_ms)
    end = now + seconds
    result.latencies_s.extend(end - r.arrival_s for r in batch)
    result.new_tokens += sum(r.max_new_tokens for r in batch)
    result.busy_device_s += seconds * busy
    result.timeline.append((end, plan.name, memory))
    return end, memory
