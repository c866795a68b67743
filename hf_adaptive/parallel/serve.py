"""The serving loop: requests -> policy -> router -> the engine's current layout, with live re-sharding.

Contract: rank 0 runs ``Controller`` (an inbox fed by a trace replayer or the HTTP endpoint, the
policy, the router, telemetry); every other rank runs ``follow``. Each step rank 0 broadcasts one
command over a gloo control group: ``("reshard", plan_name, reason)``, ``("run", batches_per_replica)``
or ``("stop",)``; all ranks then execute it with ``execute``. A switch happens only between batches, so
in-flight requests always finish on the layout they started on, and queued requests run on the new one:
none is lost (the test counts them). Batches are admitted by memory (``capacity.py``): a request too big for the
current layout alone makes the adaptive engine force a memory-splitting layout; where none holds it (or the plan
is static) it is refused with the reason and the fix (``Pending.error``, telemetry ``rejected``), never run into
an out-of-memory error.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from hf_adaptive.parallel.capacity import ReplicaMemory, admit, replica_rows
from hf_adaptive.parallel.engine import Engine
from hf_adaptive.parallel.plans import ParallelPlan
from hf_adaptive.parallel.requests import Request, route
from hf_adaptive.parallel.telemetry import RequestRecord, SwitchRecord, Telemetry
from hf_adaptive.policy.parallel_policy import STRATEGIES, ParallelPolicy, WorkloadSignals
from hf_adaptive.units import format_bytes

logger = logging.getLogger(__name__)


CPU_DEFAULT_MEMORY_BYTES = 16 * 2**30


@dataclass(frozen=True)
class ServeConfig:
    """Scheduling knobs.

    Args:
        max_batch_per_replica: requests per replica per batch (an upper bound; memory may allow fewer).
        batch_cap_per: ``"replica"`` (the cap above is per replica) or ``"device"`` (it is per device a replica
            spans, so TP and PP batch as many rows as DP over the same devices); see ``capacity.replica_rows``.
        pad_token_id: left-padding id.
        eos_token_id: stop id (None: always generate ``max_new_tokens``).
        device_memory_bytes: memory budget per device, for the memory signal and batch admission. None: the
            card's memory on CUDA (the worker caps the allocator when a smaller budget is given), 16 GiB on CPU.
        memory_headroom: admission keeps each device under ``(1 - memory_headroom)`` of the budget, leaving
            room for what the analytic estimate (``capacity.py``) leaves out (workspaces, fragmentation).
        idle_poll_s: how long the controller waits for a request when the inbox is empty.
    """

    max_batch_per_replica: int = 8
    batch_cap_per: str = "replica"
    pad_token_id: int = 0
    eos_token_id: int | None = None
    device_memory_bytes: int | None = None
    memory_headroom: float = 0.15
    idle_poll_s: float = 0.02

    def __post_init__(self) -> None:
        if not 0 <= self.memory_headroom < 1:
            raise ValueError(f"memory_headroom must be in [0, 1), got {self.memory_headroom!r}; e.g. 0.15")
        replica_rows(ParallelPlan(), self.max_batch_per_replica, self.batch_cap_per)  # validates both

    def rows_per_replica(self, plan: ParallelPlan) -> int:
        """The batch cap of one replica of ``plan`` (``capacity.replica_rows``)."""
        return replica_rows(plan, self.max_batch_per_replica, self.batch_cap_per)


def budget_bytes(engine: Engine, config: ServeConfig) -> int:
    """This rank's memory budget: the configured one, capped by the card on CUDA."""
    if engine.device.type == "cuda":
        total = torch.cuda.get_device_properties(engine.device).total_memory
        return min(total, config.device_memory_bytes or total)
    return config.device_memory_bytes or CPU_DEFAULT_MEMORY_BYTES


def free_bytes(engine: Engine, config: ServeConfig) -> float:
    """What admission may fill on this rank: the budget less headroom, less what the shard holds now."""
    held = torch.cuda.memory_allocated(engine.device) if engine.device.type == "cuda" else engine.shard.param_bytes()
    return budget_bytes(engine, config) * (1 - config.memory_headroom) - held


def execute(engine: Engine, command: tuple, control_group: Any, config: ServeConfig) -> Any:
    """Run one broadcast command on this rank; returns what rank 0 needs (gathered results or costs)."""
    kind = command[0]
    if kind == "reshard":
        cost_s = engine.reshard(ParallelPlan.parse(command[1]))
        return _gather((cost_s, free_bytes(engine, config)), engine, control_group)
    if kind == "run":
        shard = engine.shard
        mine: list[Request] = command[1][shard.dp_index]
        results = _generate(engine, mine, config) if mine else {}
        leader = shard.stage == 0 and shard.tp_rank == 0
        return _gather((results if leader else {}, memory_fraction(engine, config)), engine, control_group)
    return None


def _generate(engine: Engine, batch: list[Request], config: ServeConfig) -> dict[str, list[int]]:
    width = max(len(r.prompt_ids) for r in batch)
    ids = torch.full((len(batch), width), config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(batch):
        ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids):] = 1
    tokens = engine.generate(ids, mask, max(r.max_new_tokens for r in batch), config.eos_token_id)
    return {r.id: tokens[i, : r.max_new_tokens].tolist() for i, r in enumerate(batch)}


def memory_fraction(engine: Engine, config: ServeConfig) -> float:
    """Peak device memory since the last call over the budget (CUDA), or the shard's weights over it (CPU)."""
    if engine.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)
        return peak / budget_bytes(engine, config)
    return engine.shard.param_bytes() / budget_bytes(engine, config)


def _gather(item: Any, engine: Engine, control_group: Any) -> list[Any] | None:
    out = [None] * engine.world_size if engine.rank == 0 else None
    dist.gather_object(item, out, dst=0, group=control_group)
    return out


def _broadcast(command: tuple | None, control_group: Any) -> tuple:
    box = [command]
    dist.broadcast_object_list(box, src=0, group=control_group)
    return box[0]


def follow(engine: Engine, control_group: Any, config: ServeConfig) -> None:
    """Non-zero ranks: execute rank 0's commands until it says stop."""
    while True:
        command = _broadcast(None, control_group)
        if command[0] == "stop":
            return
        execute(engine, command, control_group, config)


@dataclass
class Pending:
    """A request waiting for its tokens; ``done`` is set when they arrive (the HTTP thread waits on it)."""

    request: Request
    done: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] | None = None
    plan: str = ""
    error: str | None = None  # set instead of tokens when the request was refused (see Controller._reject)


class Controller:
    """Rank 0: pulls requests from ``inbox``, asks the policy for a plan, routes batches, records all."""

    def __init__(self, engine: Engine, control_group: Any, config: ServeConfig,
                 plan_for: Callable[[str], ParallelPlan], policy: ParallelPolicy | None,
                 static_plan: ParallelPlan | None = None) -> None:
        if (policy is None) == (static_plan is None):
            raise ValueError("give exactly one of policy (adaptive) or static_plan (fixed layout)")
        self.engine, self.group, self.config = engine, control_group, config
        self.plan_for, self.policy, self.static_plan = plan_for, policy, static_plan
        self.inbox: queue.Queue[Pending] = queue.Queue()
        self.telemetry = Telemetry()
        self._queue: deque[Pending] = deque()
        self._arrivals: deque[float] = deque(maxlen=64)
        self._new_lens: list[int] = []  # lengths of requests arrived since the policy last looked
        self._memory: list[float] = [0.0] * engine.world_size
        self._free_bytes = float("inf")  # admission room per device under the current plan (set by _switch)
        self._memory_models: dict[str, ReplicaMemory] = {}
        self._room_tried: dict[str, set[str]] = {}  # request id -> plans tried to fit it (see _make_room)
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def submit(self, request: Request) -> Pending:
        """Queue a request (thread-safe); wait on the returned ``done`` event for its tokens. Its latency
        counts from here: a request that arrives while a batch runs waits in the inbox, and that wait is
        part of what its caller sees."""
        request.arrival_s = self.now()
        pending = Pending(request)
        self.inbox.put(pending)
        return pending

    def start(self, plan: ParallelPlan | None = None) -> None:
        """Build the first layout (the static plan, or the policy's initial strategy); the clock starts here."""
        first = self.first_plan(plan)
        if self.engine.plan != first:  # warm_up leaves the engine on the first plan
            self._switch(first, "initial layout", count=False)
        self._t0 = time.perf_counter()

    def first_plan(self, plan: ParallelPlan | None = None) -> ParallelPlan:
        return plan or self.static_plan or self.plan_for(self.policy.current)

    def usable_plans(self) -> list[ParallelPlan]:
        """Every layout this controller may run: the static plan, or each strategy's plan (adaptive)."""
        if self.static_plan is not None:
            return [self.static_plan]
        return list(dict.fromkeys(self.plan_for(s) for s in STRATEGIES))

    def warm_up(self, prompt_tokens: int = 256, new_tokens: int = 16) -> float:
        """Before ``start``: build every usable layout once and run one full batch (``rows_per_replica``
        rows of ``prompt_tokens``, fewer if memory admission says so) on each replica of it, untimed and
        unrecorded, ending on the first plan. The
        first batches after a layout is built run several times slower (CUDA context, library handles, the
        caching allocator growing block by block as the KV cache grows); a server pays that at start-up, not on
        its first requests, and an adaptive engine would otherwise pay it again on each layout's first switch.
        Returns the seconds it took."""
        if prompt_tokens < 1 or new_tokens < 1:
            raise ValueError(f"prompt_tokens and new_tokens must be >= 1, got {prompt_tokens}, {new_tokens}")
        start = time.perf_counter()
        first = self.first_plan()
        for plan in [p for p in self.usable_plans() if p != first] + [first]:
            self._switch(plan, "warm-up", count=False)
            batch = [Request(id=f"warm-up-{i}", arrival_s=0.0, max_new_tokens=new_tokens,
                             prompt_ids=[1 + (i + j) % 97 for j in range(prompt_tokens)])
                     for i in range(plan.dp * self.config.rows_per_replica(plan))]
            # Admitted like any batch: a warm-up must not run a tight memory budget out of memory.
            take, fits = admit(batch, plan, self._free_bytes, self._memory_model(plan),
                               self.config.rows_per_replica(plan), route)
            if fits:
                command = _broadcast(("run", route(batch[:take], plan.dp)), self.group)
                execute(self.engine, command, self.group, self.config)
        seconds = time.perf_counter() - start
        logger.info("warm-up of %d layout(s) in %.1fs", len(self.usable_plans()), seconds)
        return seconds

    def run(self, should_stop: Callable[[], bool]) -> None:
        """Serve until ``should_stop()`` is true and nothing is queued; then stop every rank."""
        while True:
            self._drain_inbox()
            if not self._queue:
                if should_stop() and self.inbox.empty():
                    break
                time.sleep(self.config.idle_poll_s)
                continue
            self._maybe_switch()
            self._run_batch()
        _broadcast(("stop",), self.group)

    def _drain_inbox(self) -> None:
        while True:
            try:
                pending = self.inbox.get_nowait()
            except queue.Empty:
                return
            self._arrivals.append(pending.request.arrival_s)
            self._new_lens.append(pending.request.total_tokens)
            self._queue.append(pending)

    def _signals(self) -> WorkloadSignals:
        now = self.now()
        recent = [t for t in self._arrivals if t >= now - 5.0]
        new_lens, self._new_lens = tuple(self._new_lens), []
        return WorkloadSignals(now_s=now, seq_lens=new_lens,
                               memory_fraction=tuple(self._memory), concurrent_requests=len(self._queue),
                               arrival_rate_per_s=len(recent) / 5.0,
                               queue_seq_lens=tuple(p.request.total_tokens for p in self._queue),
                               queue_new_tokens=tuple(p.request.max_new_tokens for p in self._queue))

    def _maybe_switch(self) -> None:
        if self.policy is None or self._queue[0].request.id in self._room_tried:
            return  # the head request waits for the layout it was given room in: no policy switch-back first
        n_before = len(self.policy.history)
        strategy = self.policy.observe(self._signals())
        plan = self.plan_for(strategy)
        if plan != self.engine.plan:
            reason = self.policy.history[-1].reason if len(self.policy.history) > n_before else strategy
            self._switch(plan, reason)

    def _switch(self, plan: ParallelPlan, reason: str, count: bool = True) -> None:
        before = self.engine.plan.name if self.engine.plan else "none"
        start = time.perf_counter()
        command = _broadcast(("reshard", plan.name, reason), self.group)
        gathered = execute(self.engine, command, self.group, self.config)
        cost = time.perf_counter() - start
        self._free_bytes = min(free for _, free in gathered)
        self.telemetry.current_plan = plan.name
        if count:
            self.telemetry.switches.append(SwitchRecord(self.now(), before, plan.name, reason, cost))
        logger.info("layout %s -> %s in %.3fs (%s)", before, plan.name, cost, reason)

    def _make_room(self, request: Request) -> bool:
        """Adaptive mode: the head request does not fit the current layout alone; switch (policy.force) to the
        first memory-splitting layout not tried for it yet. Returns False when there is none left to try."""
        if self.policy is None:
            return False
        tried = self._room_tried.setdefault(request.id, {self.engine.plan.name})
        for strategy in ("hybrid", "pp"):
            plan = self.plan_for(strategy)
            if plan.name in tried:
                continue
            tried.add(plan.name)
            need = _needed_bytes(self._memory_model(self.engine.plan), request)
            reason = (f"request {request.id} needs ~{format_bytes(need)} per device on {self.engine.plan.name}, "
                      f"{format_bytes(max(self._free_bytes, 0))} free: trying {plan.name}")
            self.policy.force(strategy, reason, self.now())
            self._switch(plan, reason)
            return True
        return False

    def _reject(self, pending: Pending) -> None:
        """Refuse a request no layout tried can hold: the caller gets the reason and the fix, nothing crashes."""
        plan, request = self.engine.plan, pending.request
        need = _needed_bytes(self._memory_model(plan), request)
        tried = sorted(self._room_tried.pop(request.id, {plan.name}))
        pending.error = (f"request {request.id} ({len(request.prompt_ids)} prompt + {request.max_new_tokens} new "
                         f"tokens) needs ~{format_bytes(need)} per device on plan {plan.name} but "
                         f"{format_bytes(max(self._free_bytes, 0))} is free under the memory budget (layouts tried: "
                         f"{tried}); "
                         "shorten the prompt or max_new_tokens, raise --device-memory-gb, or serve with a plan that "
                         "splits the model (--plan tp / pp / auto)")
        logger.warning("rejected: %s", pending.error)
        self.telemetry.add_rejected(request.id, self.now(), plan.name, pending.error)
        pending.done.set()

    def _memory_model(self, plan: ParallelPlan) -> ReplicaMemory:
        if plan.name not in self._memory_models:
            model = self.engine.host_model
            self._memory_models[plan.name] = ReplicaMemory.for_plan(model.config, plan, model.dtype.itemsize)
        return self._memory_models[plan.name]

    def _run_batch(self) -> None:
        plan = self.engine.plan
        queued = [p.request for p in self._queue]
        take, fits = admit(queued, plan, self._free_bytes, self._memory_model(plan),
                           self.config.rows_per_replica(plan), route)
        if not fits:
            if not self._make_room(queued[0]):
                self._reject(self._queue.popleft())
            return
        batch = [self._queue.popleft() for _ in range(take)]
        for p in batch:
            self._room_tried.pop(p.request.id, None)
        start = self.now()
        command = _broadcast(("run", route([p.request for p in batch], plan.dp)), self.group)
        gathered = execute(self.engine, command, self.group, self.config)
        end = self.now()
        tokens: dict[str, list[int]] = {}
        for results, _ in gathered:
            tokens.update(results)
        self._memory = [mem for _, mem in gathered]
        records = []
        for p in batch:
            p.tokens, p.plan = tokens[p.request.id], plan.name
            records.append(RequestRecord(p.request.id, plan.name, p.request.arrival_s, start, end,
                                         len(p.request.prompt_ids), len(p.tokens), p.tokens))
            p.done.set()
        self.telemetry.add_batch(plan.name, start, end, records, self._memory)


def _needed_bytes(memory: ReplicaMemory, request: Request) -> float:
    return memory.batch_bytes(1, len(request.prompt_ids), request.max_new_tokens)


def replay_trace(controller: Controller, requests: list[Request], time_scale: float = 1.0) -> threading.Thread:
    """Feed ``requests`` into the controller at their (scaled) arrival times from a background thread."""

    def feed() -> None:
        t0 = time.perf_counter()
        for r in requests:
            delay = r.arrival_s * time_scale - (time.perf_counter() - t0)
            if delay > 0:
                time.sleep(delay)
            controller.submit(r)

    thread = threading.Thread(target=feed, name="trace-replay", daemon=True)
    thread.start()
    return thread
