"""Per-plan latency and memory model, calibrated from measured runs (``eval/calibrate_parallel.py``).

Contract: pure (no torch). For one replica running ``B`` requests padded to ``L`` prompt tokens and
``G`` new tokens:

    prefill_ms = prefill_ms_base + prefill_ms_per_token * B * L
    step_ms    = decode_ms_base + decode_ms_per_seq * B + decode_ms_per_ctx_token * B * ctx
    total_ms   = prefill_ms + sum over the G steps of step_ms (ctx grows from L to L + G)
    memory     = weights_bytes_per_device + kv_bytes_per_token_per_device * B * (L + G)
                 [+ prefill_bytes_per_token_per_device * B * L + mask_bytes_per_token_squared * B * L * L]

The bracketed terms are ``capacity.ReplicaMemory``'s prefill activations and padding mask; calibrations that carry
them (and a ``memory_headroom``) make the simulator admit batches exactly as the serving engine does.
The calibration JSON carries these coefficients per plan name (``tp2``, ``pp2``, ``dp2``, ``tp2xpp2``),
a switch cost, the device memory, optionally the extra time of the first batches after a layout change
(``warm_batch_extra_ms``, measured by ``eval/calibrate_from_serve.py``) and a ``meta`` block naming where it was
measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hf_adaptive.parallel.capacity import ReplicaMemory, admit, replica_rows
from hf_adaptive.parallel.plans import ParallelPlan
from hf_adaptive.parallel.requests import route
from hf_adaptive.policy.parallel_policy import STRATEGIES, WorkloadSummary
from hf_adaptive.validation import FieldValueError, check_number, check_type, show


@dataclass(frozen=True)
class PlanCost:
    """Fitted coefficients of one plan (milliseconds, bytes)."""

    prefill_ms_base: float
    prefill_ms_per_token: float
    decode_ms_base: float
    decode_ms_per_seq: float
    decode_ms_per_ctx_token: float
    weights_bytes_per_device: float
    kv_bytes_per_token_per_device: float
    prefill_bytes_per_token_per_device: float = 0.0
    mask_bytes_per_token_squared: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):  # a negative or NaN cost would run virtual time backwards or stall it
            value = check_number(getattr(self, f.name), f.name, minimum=0.0, fix=f"{f.name}=1.0 (or re-fit it)")
            object.__setattr__(self, f.name, float(value))

    def replica_memory(self) -> ReplicaMemory:
        """The per-device batch memory model admission uses (weights excluded)."""
        return ReplicaMemory(self.kv_bytes_per_token_per_device, self.prefill_bytes_per_token_per_device,
                             self.mask_bytes_per_token_squared)

    def batch_ms(self, batch: int, prompt_len: int, new_tokens: int) -> float:
        """Milliseconds for one replica to serve ``batch`` rows of ``prompt_len`` (padded) + ``new_tokens``."""
        if batch == 0:
            return 0.0
        prefill = self.prefill_ms_base + self.prefill_ms_per_token * batch * prompt_len
        mean_ctx = prompt_len + new_tokens / 2.0  # the sum over steps of a linearly growing context
        steps = new_tokens * (self.decode_ms_base + self.decode_ms_per_seq * batch
                              + self.decode_ms_per_ctx_token * batch * mean_ctx)
        return prefill + steps

    def memory_bytes(self, batch: int, tokens_per_row: int) -> float:
        return self.weights_bytes_per_device + self.kv_bytes_per_token_per_device * batch * tokens_per_row


@dataclass(frozen=True)
class Calibration:
    """All plans of one machine size, plus switch cost and device memory."""

    world_size: int
    device_memory_bytes: float
    switch_cost_ms: float
    plans: dict[str, PlanCost]
    meta: dict[str, Any]
    memory_headroom: float = 0.0  # admission keeps each device under (1 - this) of device_memory_bytes
    # extra ms of the 1st, 2nd, ... batch after a layout change (start-up included): measured slow first batches
    warm_batch_extra_ms: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        check_number(self.world_size, "world_size", minimum=1, integer=True, fix="world_size=2")
        for name, min_open, fix in (("device_memory_bytes", True, "device_memory_bytes=80e9"),
                                    ("switch_cost_ms", False, "switch_cost_ms=500.0")):
            value = check_number(getattr(self, name), name, minimum=0.0, min_open=min_open, fix=fix)
            object.__setattr__(self, name, float(value))
        check_number(self.memory_headroom, "memory_headroom", minimum=0.0, maximum=1.0, max_open=True,
                     fix="memory_headroom=0.1")
        check_type(self.meta, "meta", dict, "meta={} or the calibration's meta block")
        for i, extra in enumerate(self.warm_batch_extra_ms):
            check_number(extra, f"warm_batch_extra_ms[{i}]", minimum=0.0, fix="warm_batch_extra_ms=(120.0,)")
        check_type(self.plans, "plans", dict, 'plans={"tp2": PlanCost(...)}')
        if not self.plans:
            raise FieldValueError("plans is empty. Fix: calibrate at least one plan.", "plans")
        for name, cost in self.plans.items():
            check_type(cost, f"plans[{name!r}]", PlanCost, "PlanCost(prefill_ms_base=..., ...)")
            _check_plan_name(name, self.world_size)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration JSON; every field is checked (``calibration_file.read_calibration``)."""
        from hf_adaptive.parallel.calibration_file import read_calibration  # it imports this module

        return read_calibration(path)

    def free_bytes(self, plan_name: str) -> float:
        """What admission may fill per device on ``plan_name``: the budget less headroom, less the weights."""
        return self.device_memory_bytes * (1 - self.memory_headroom) - self.cost(plan_name).weights_bytes_per_device

    def cost(self, plan_name: str) -> PlanCost:
        if plan_name not in self.plans:
            raise ValueError(f"plan {plan_name!r} is not in the calibration (has {sorted(self.plans)}); "
                             f"calibrate it or pick one of those")
        return self.plans[plan_name]


def _check_plan_name(name: str, world_size: int) -> None:
    try:
        plan = ParallelPlan.parse(name)
    except (ValueError, TypeError, AttributeError):
        plan = None
    if plan is None or plan.world_size != world_size:
        got = "is not a plan name" if plan is None else f"spans {plan.world_size} devices"
        raise FieldValueError(f"plan {show(name)} {got}; the calibration's world_size is {world_size}. Fix: "
                              f"name plans like 'tp{world_size}', 'pp{world_size}', 'dp{world_size}'.", f"plans.{name}")


def batch_cost(calib: Calibration, plan: Any, batch: Sequence[Any],
               prompt_len: Callable[[Any], int]) -> tuple[float, float, int]:
    """``(seconds, peak memory fraction, busy devices)`` of one batch on ``plan``, its rows split over the DP
    replicas as the router splits them at run time; the slowest replica decides the time. Items need
    ``prompt_len(item)``, ``item.max_new_tokens`` and ``item.total_tokens`` (the router's balance key)."""
    cost = calib.cost(plan.name)
    memory = cost.replica_memory()
    slowest_ms, peak_bytes, busy = 0.0, 0.0, 0
    for part in route(batch, plan.dp):
        if not part:
            continue
        width = max(prompt_len(r) for r in part)
        new = max(r.max_new_tokens for r in part)
        slowest_ms = max(slowest_ms, cost.batch_ms(len(part), width, new))
        peak_bytes = max(peak_bytes, memory.batch_bytes(len(part), width, new))
        busy += plan.tp  # one stage of tp devices works at a time without micro-batching
    peak = (cost.weights_bytes_per_device + peak_bytes) / calib.device_memory_bytes
    return slowest_ms / 1e3, peak, busy


@dataclass(frozen=True)
class _Queued:
    """A queued request as the policy sees it: prompt and new-token counts."""

    prompt_tokens: int
    max_new_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.max_new_tokens


def drain_seconds(calib: Calibration, plan: Any, queue: Sequence[_Queued],
                  max_batch_per_replica: int, batch_cap_per: str = "replica") -> tuple[float, int]:
    """``(seconds, served)``: serve ``queue`` FIFO on ``plan`` in the batches admission forms
    (``capacity.admit``, with the batch cap of ``capacity.replica_rows``), stopping at the first request that does
    not fit the plan even alone; ``served`` counts the requests before it (``len(queue)`` when all fit)."""
    memory, free = calib.cost(plan.name).replica_memory(), calib.free_bytes(plan.name)
    rows = replica_rows(plan, max_batch_per_replica, batch_cap_per)
    seconds, i = 0.0, 0
    while i < len(queue):
        head = queue[i:i + rows * plan.dp]
        take, fits = admit(head, plan, free, memory, rows, route, lambda r: r.prompt_tokens)
        if not fits:
            break
        seconds += batch_cost(calib, plan, head[:take], lambda r: r.prompt_tokens)[0]
        i += take
    return seconds, i


def queue_drain_predictor(calib: Calibration, plan_for: Callable[[str], Any], max_batch_per_replica: int,
                          head_requests: int = 0,
                          batch_cap_per: str = "replica") -> Callable[[str, WorkloadSummary], float | None]:
    """``predict_s(strategy, summary)`` for ``cost_aware_rule``: seconds to serve the live queue FIFO starting
    on ``strategy``'s plan, in the batches admission would form there.

    ``max_batch_per_replica`` and ``batch_cap_per`` are the server's batch cap (``capacity.replica_rows``).
    ``head_requests`` > 0 prices only the next that many queued requests (the work the next batches run, as the
    threshold rule's ``queue_head_requests``).

    When a queued request does not fit the plan even in a batch of its own (a long document on a DP replica under
    a memory budget), the plan serves the requests before it and then hands over: the prediction adds one switch
    (``switch_cost_ms``) and the rest of the queue on the fastest other plan that holds all of it. So DP is
    priced for the chats it can drain ahead of a document, not refused for the document, and the rule leaves DP
    when the document reaches the head of the queue rather than when it enters the priced window. None when the
    plan cannot hold the first queued request, or nothing can hold the rest.
    """
    check_number(head_requests, "head_requests", minimum=0, integer=True, fix="head_requests=0 (the whole queue)")
    replica_rows(ParallelPlan(), max_batch_per_replica, batch_cap_per)  # validates the cap early

    def drain(strategy: str, queue: Sequence[_Queued]) -> tuple[float, int] | None:
        plan = plan_for(strategy)
        return (drain_seconds(calib, plan, queue, max_batch_per_replica, batch_cap_per)
                if plan.name in calib.plans else None)

    def predict_s(strategy: str, summary: WorkloadSummary) -> float | None:
        lens, news = summary.queue_seq_lens, summary.queue_new_tokens
        news = news if len(news) == len(lens) else (0,) * len(lens)
        if head_requests:
            lens, news = lens[:head_requests], news[:head_requests]
        queue = [_Queued(max(1, n - g), g) for n, g in zip(lens, news)]
        first = drain(strategy, queue)
        if first is None:
            return None
        seconds, served = first
        if served == len(queue):
            return seconds
        if served == 0:
            return None
        own = plan_for(strategy).name
        rest = [d[0] for s in STRATEGIES if plan_for(s).name != own
                and (d := drain(s, queue[served:])) is not None and d[1] == len(queue) - served]
        return seconds + calib.switch_cost_ms / 1e3 + min(rest) if rest else None

    return predict_s
