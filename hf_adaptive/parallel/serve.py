"""The serving loop: requests -> policy -> router -> the engine's current layout, with live re-sharding.

Contract: rank 0 runs ``Controller`` (an inbox fed by a trace replayer or the HTTP endpoint, the
policy, the router, telemetry); every other rank runs ``protocol.follow``. Each step rank 0 broadcasts one
command of the rank wire protocol (``protocol.py``: ``Reshard``, ``Run`` or ``Stop``) and all ranks execute
it. Results come back by position in the batch, never by request id. A switch happens only between batches, so
in-flight requests always finish on the layout they started on, and queued requests run on the new one:
none is lost (the test counts them). Batches are admitted by memory (``capacity.py``): a request too big for the
current layout alone makes the adaptive engine force a memory-splitting layout; where none holds it (or the plan
is static) it is refused with the reason and the fix (``Pending.error``, telemetry ``rejected``), never run into
an out-of-memory error.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hf_adaptive.parallel.capacity import ReplicaMemory, admit
from hf_adaptive.parallel.engine import Engine
from hf_adaptive.parallel.plans import ParallelPlan
from hf_adaptive.parallel.protocol import (
    Reshard,
    Run,
    ServeConfig,
    Stop,
    broadcast_command,
    execute,
    follow,
    tokens_by_request,
)
from hf_adaptive.parallel.requests import Request, route
from hf_adaptive.parallel.telemetry import RequestRecord, SwitchRecord, Telemetry
from hf_adaptive.policy.parallel_policy import STRATEGIES, ParallelPolicy, WorkloadSignals
from hf_adaptive.units import format_bytes

logger = logging.getLogger(__name__)

__all__ = ["Controller", "Lifecycle", "Pending", "ServeConfig", "execute", "follow", "replay_trace"]


class Lifecycle:
    """Flags the worker and the app share: ``ready`` once serving starts; ``draining`` once a stop was asked for
    (SIGTERM, SIGINT, ``/shutdown``, ``--serve-seconds``): new requests then get 503, queued ones still finish,
    until ``drain_seconds`` after the stop, when the rest are refused."""

    def __init__(self, drain_seconds: float = 30.0) -> None:
        if not drain_seconds > 0:
            raise ValueError(f"drain_seconds must be > 0, got {drain_seconds!r}")
        self.ready = threading.Event()
        self.draining = threading.Event()
        self.drain_seconds = drain_seconds
        self._drain_started: float | None = None

    def begin_drain(self, why: str) -> None:
        """Stop accepting; the drain deadline counts from the first call."""
        if self._drain_started is None:
            self._drain_started = time.monotonic()
            logger.info("draining (%s): finishing queued requests within %.0f s", why, self.drain_seconds)
        self.draining.set()

    def drain_deadline_passed(self) -> bool:
        return self._drain_started is not None and time.monotonic() - self._drain_started > self.drain_seconds


@dataclass
class Pending:
    """A request waiting for its tokens; ``done`` is set (and ``on_done`` called) when they arrive or it is refused.

    ``serial`` is issued by the controller and unique per run: the scheduler keys its own state by it, never by
    ``request.id``, which a client or a trace may repeat.
    """

    request: Request
    serial: int = 0
    on_done: Callable[[Pending], None] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] | None = None
    plan: str = ""
    error: str | None = None  # set instead of tokens when the request was refused (see Controller._reject)
    refused_for: str = ""  # "memory" (no layout holds it) or "shutdown" (the drain deadline passed)

    def finish(self) -> None:
        """Wake the waiter: set ``done``, then call ``on_done`` (from the controller's thread)."""
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)


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
        self._arrivals: deque[float] = deque(maxlen=config.arrival_history)
        self._new_lens: list[int] = []  # lengths of requests arrived since the policy last looked
        self._memory: list[float] = [0.0] * engine.world_size
        self._free_bytes = float("inf")  # admission room per device under the current plan (set by _switch)
        self._memory_models: dict[str, ReplicaMemory] = {}
        self._room_tried: dict[int, set[str]] = {}  # Pending.serial -> plans tried to fit it (see _make_room)
        self._serials = itertools.count(1)
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def submit(self, request: Request, on_done: Callable[[Pending], None] | None = None) -> Pending:
        """Queue a request (thread-safe); wait on the returned ``done`` event for its tokens, or pass ``on_done``
        (called from the controller's thread). Its latency counts from here: a request that arrives while a batch
        runs waits in the inbox, and that wait is part of what its caller sees."""
        request.arrival_s = self.now()
        pending = Pending(request, serial=next(self._serials), on_done=on_done)
        self.inbox.put(pending)
        return pending

    def queued(self) -> int:
        """Requests submitted and not yet finished or running (approximate while the controller runs)."""
        return self.inbox.qsize() + len(self._queue)

    def start(self, plan: ParallelPlan | None = None) -> None:
        """Build the first layout (the static plan, or the policy's initial strategy); the clock starts here."""
        first = self.first_plan(plan)
        if self.engine.plan != first:  # warm_up leaves the engine on the first plan
            self._switch(first, "initial layout", count=False)
        self.telemetry.current_plan = first.name
        self._t0 = time.perf_counter()

    def first_plan(self, plan: ParallelPlan | None = None) -> ParallelPlan:
        return plan or self.static_plan or self.plan_for(self.policy.current)

    def usable_plans(self) -> list[ParallelPlan]:
        """Every layout this controller may run: the static plan, or each strategy's plan (adaptive)."""
        if self.static_plan is not None:
            return [self.static_plan]
        return list(dict.fromkeys(self.plan_for(s) for s in STRATEGIES))

    def warm_up(self) -> float:
        """Before ``start``: build every usable layout once and run one full batch (``rows_per_replica``
        rows of ``config.warmup_prompt_tokens``, fewer if memory admission says so) on each replica of it,
        untimed and unrecorded, ending on the first plan. The first batches after a layout is built run several
        times slower (CUDA context, library handles, the caching allocator growing block by block as the KV cache
        grows); a server pays that at start-up, not on its first requests, and an adaptive engine would otherwise
        pay it again on each layout's first switch. Returns the seconds it took."""
        start = time.perf_counter()
        first = self.first_plan()
        for plan in [p for p in self.usable_plans() if p != first] + [first]:
            self._switch(plan, "warm-up", count=False)
            batch = self._warmup_batch(plan.dp * self.config.rows_per_replica(plan))
            # Admitted like any batch: a warm-up must not run a tight memory budget out of memory.
            take, fits = admit(batch, plan, self._free_bytes, self._memory_model(plan),
                               self.config.rows_per_replica(plan), route)
            if fits:
                command = broadcast_command(_run_command(batch[:take], plan), self.group)
                execute(self.engine, command, self.group, self.config)
        seconds = time.perf_counter() - start
        logger.info("warm-up of %d layout(s) in %.1fs", len(self.usable_plans()), seconds)
        return seconds

    def _warmup_batch(self, rows: int) -> list[Request]:
        c = self.config
        return [Request(id=f"warm-up-{i}", arrival_s=0.0, max_new_tokens=c.warmup_new_tokens,
                        prompt_ids=[1 + (i + j) % c.warmup_token_modulus for j in range(c.warmup_prompt_tokens)])
                for i in range(rows)]

    def run(self, should_stop: Callable[[], bool], give_up: Callable[[], bool] = lambda: False) -> None:
        """Serve until ``should_stop()`` is true and nothing is queued; then stop every rank. Once ``give_up()``
        is true (a drain deadline passed), everything still queued is refused (``refused_for="shutdown"``)."""
        while True:
            self._drain_inbox()
            if give_up():
                self._refuse_queued("the server is shutting down and its drain deadline passed; retry elsewhere")
                if should_stop():
                    break
            if not self._queue:
                if should_stop() and self.inbox.empty():
                    break
                time.sleep(self.config.idle_poll_s)
                continue
            self._maybe_switch()
            self._run_batch()
        broadcast_command(Stop(), self.group)

    def _refuse_queued(self, reason: str) -> None:
        while self._queue:
            pending = self._queue.popleft()
            pending.error, pending.refused_for = reason, "shutdown"
            self.telemetry.add_rejected(pending.request.id, self.now(), self.engine.plan.name, reason)
            pending.finish()

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
        window = self.config.arrival_window_s
        recent = [t for t in self._arrivals if t >= now - window]
        new_lens, self._new_lens = tuple(self._new_lens), []
        return WorkloadSignals(now_s=now, seq_lens=new_lens,
                               memory_fraction=tuple(self._memory), concurrent_requests=len(self._queue),
                               arrival_rate_per_s=len(recent) / window,
                               queue_seq_lens=tuple(p.request.total_tokens for p in self._queue),
                               queue_new_tokens=tuple(p.request.max_new_tokens for p in self._queue))

    def _maybe_switch(self) -> None:
        if self.policy is None or self._queue[0].serial in self._room_tried:
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
        command = broadcast_command(Reshard(plan.name, reason), self.group)
        gathered = execute(self.engine, command, self.group, self.config)
        cost = time.perf_counter() - start
        self._free_bytes = min(free for _, free in gathered)
        self.telemetry.current_plan = plan.name
        if count:
            self.telemetry.switches.append(SwitchRecord(self.now(), before, plan.name, reason, cost))
        logger.info("layout %s -> %s in %.3fs (%s)", before, plan.name, cost, reason)

    def _make_room(self, pending: Pending) -> bool:
        """Adaptive mode: the head request does not fit the current layout alone; switch (policy.force) to the
        first memory-splitting layout not tried for it yet. Returns False when there is none left to try."""
        if self.policy is None:
            return False
        request = pending.request
        tried = self._room_tried.setdefault(pending.serial, {self.engine.plan.name})
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
        tried = sorted(self._room_tried.pop(pending.serial, {plan.name}))
        pending.error = (f"request {request.id} ({len(request.prompt_ids)} prompt + {request.max_new_tokens} new "
                         f"tokens) needs ~{format_bytes(need)} per device on plan {plan.name} but "
                         f"{format_bytes(max(self._free_bytes, 0))} is free under the memory budget (layouts tried: "
                         f"{tried}); "
                         "shorten the prompt or max_new_tokens, raise --device-memory-gb, or serve with a plan that "
                         "splits the model (--plan tp / pp / auto)")
        logger.warning("rejected: %s", pending.error)
        self.telemetry.add_rejected(request.id, self.now(), plan.name, pending.error)
        pending.refused_for = "memory"
        pending.finish()

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
            if not self._make_room(self._queue[0]):
                self._reject(self._queue.popleft())
            return
        batch = [self._queue.popleft() for _ in range(take)]
        for p in batch:
            self._room_tried.pop(p.serial, None)
        start = self.now()
        command = _run_command([p.request for p in batch], plan)
        gathered = execute(self.engine, broadcast_command(command, self.group), self.group, self.config)
        end = self.now()
        tokens = tokens_by_request(command.batches, gathered)
        self._memory = [mem for _, mem in gathered]
        records = []
        for p in batch:
            p.tokens, p.plan = tokens[id(p.request)], plan.name
            records.append(RequestRecord(p.request.id, plan.name, p.request.arrival_s, start, end,
                                         len(p.request.prompt_ids), len(p.tokens), p.tokens))
        self.telemetry.add_batch(plan.name, start, end, records, self._memory)
        for p in batch:
            p.finish()


def _run_command(requests: list[Request], plan: ParallelPlan) -> Run:
    return Run(tuple(tuple(bucket) for bucket in route(requests, plan.dp)))


def _needed_bytes(memory: ReplicaMemory, request: Request) -> float:
    return memory.batch_bytes(1, len(request.prompt_ids), request.max_new_tokens)


def replay_trace(controller: Controller, requests: list[Request], time_scale: float = 1.0,
                 stop: threading.Event | None = None) -> threading.Thread:
    """Feed ``requests`` into the controller at their (scaled) arrival times from a background thread; once
    ``stop`` is set (a drain began), the rest of the trace is not fed."""
    stop = stop or threading.Event()

    def feed() -> None:
        t0 = time.perf_counter()
        for r in requests:
            delay = r.arrival_s * time_scale - (time.perf_counter() - t0)
            if stop.wait(max(delay, 0.0)):
                return
            controller.submit(r)

    thread = threading.Thread(target=feed, name="trace-replay", daemon=True)
    thread.start()
    return thread
