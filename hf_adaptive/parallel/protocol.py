"""The rank wire protocol of the serving loop: what rank 0 broadcasts, what every rank runs, what comes back.

Contract: rank 0 broadcasts one command per step over a gloo control group (``broadcast_command``); every rank
runs it with ``execute`` and gathers its reply to rank 0. A command is ``Reshard``, ``Run`` or ``Stop``, a
frozen dataclass, never a positional tuple. A ``Run``'s results come back by position: the leader of replica
``d`` answers with ``RunResult(d, tokens)`` where ``tokens[i]`` belongs to ``batches[d][i]``, so two requests
can never swap tokens, whatever ids their callers chose. Non-zero ranks loop in ``follow`` until ``Stop``.
This module knows nothing about queues, policies or HTTP (``serve.py`` schedules, ``http_app.py`` serves).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hf_adaptive.parallel.capacity import replica_rows
from hf_adaptive.parallel.engine import Engine
from hf_adaptive.parallel.plans import ParallelPlan
from hf_adaptive.parallel.requests import Request

logger = logging.getLogger(__name__)

CPU_DEFAULT_MEMORY_BYTES = 16 * 2**30


@dataclass(frozen=True)
class ServeConfig:
    """Scheduling knobs and the named settings of the serving loop.

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
        arrival_window_s: the window over which the policy's arrival rate is counted.
        arrival_history: how many recent arrival times the controller keeps for that rate.
        warmup_prompt_tokens / warmup_new_tokens: the size of each warm-up row.
        warmup_token_modulus: warm-up prompts cycle through ids ``1 .. warmup_token_modulus`` (small enough for
            any vocabulary, varied enough that attention sees distinct keys).
    """

    max_batch_per_replica: int = 8
    batch_cap_per: str = "replica"
    pad_token_id: int = 0
    eos_token_id: int | None = None
    device_memory_bytes: int | None = None
    memory_headroom: float = 0.15
    idle_poll_s: float = 0.02
    arrival_window_s: float = 5.0
    arrival_history: int = 64
    warmup_prompt_tokens: int = 256
    warmup_new_tokens: int = 16
    warmup_token_modulus: int = 97

    def __post_init__(self) -> None:
        if not 0 <= self.memory_headroom < 1:
            raise ValueError(f"memory_headroom must be in [0, 1), got {self.memory_headroom!r}; e.g. 0.15")
        for name in ("idle_poll_s", "arrival_window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        for name in ("arrival_history", "warmup_prompt_tokens", "warmup_new_tokens", "warmup_token_modulus"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        replica_rows(ParallelPlan(), self.max_batch_per_replica, self.batch_cap_per)  # validates both

    def rows_per_replica(self, plan: ParallelPlan) -> int:
        """The batch cap of one replica of ``plan`` (``capacity.replica_rows``)."""
        return replica_rows(plan, self.max_batch_per_replica, self.batch_cap_per)


@dataclass(frozen=True)
class Reshard:
    """Every rank rebuilds its shard for ``plan_name``; replies ``(cost_s, free_bytes)``."""

    plan_name: str
    reason: str


@dataclass(frozen=True)
class Run:
    """Replica ``d`` generates for ``batches[d]``; replies ``(RunResult | None, memory_fraction)``."""

    batches: tuple[tuple[Request, ...], ...]


@dataclass(frozen=True)
class Stop:
    """Every rank leaves ``follow``."""


Command = Reshard | Run | Stop


@dataclass(frozen=True)
class RunResult:
    """One replica's tokens, in the order of its batch: ``tokens[i]`` belongs to ``Run.batches[dp_index][i]``."""

    dp_index: int
    tokens: tuple[tuple[int, ...], ...]


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


def memory_fraction(engine: Engine, config: ServeConfig) -> float:
    """Peak device memory since the last call over the budget (CUDA), or the shard's weights over it (CPU)."""
    if engine.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)
        return peak / budget_bytes(engine, config)
    return engine.shard.param_bytes() / budget_bytes(engine, config)


def execute(engine: Engine, command: Command, control_group: Any, config: ServeConfig) -> list[Any] | None:
    """Run one broadcast command on this rank; rank 0 gets every rank's reply (others get None)."""
    if isinstance(command, Reshard):
        cost_s = engine.reshard(ParallelPlan.parse(command.plan_name))
        return _gather((cost_s, free_bytes(engine, config)), engine, control_group)
    if isinstance(command, Run):
        shard = engine.shard
        mine = command.batches[shard.dp_index]
        leader = shard.stage == 0 and shard.tp_rank == 0
        tokens = _generate(engine, mine, config) if mine else ()
        result = RunResult(shard.dp_index, tokens) if leader else None
        return _gather((result, memory_fraction(engine, config)), engine, control_group)
    return None


def _generate(engine: Engine, batch: tuple[Request, ...], config: ServeConfig) -> tuple[tuple[int, ...], ...]:
    width = max(len(r.prompt_ids) for r in batch)
    ids = torch.full((len(batch), width), config.pad_token_id, dtype=torch.long)  # (B, T), left-padded
    mask = torch.zeros_like(ids)
    for i, r in enumerate(batch):
        ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids):] = 1
    tokens = engine.generate(ids, mask, max(r.max_new_tokens for r in batch), config.eos_token_id)
    return tuple(tuple(tokens[i, : r.max_new_tokens].tolist()) for i, r in enumerate(batch))


def _gather(item: Any, engine: Engine, control_group: Any) -> list[Any] | None:
    out = [None] * engine.world_size if engine.rank == 0 else None
    dist.gather_object(item, out, dst=0, group=control_group)
    return out


def broadcast_command(command: Command | None, control_group: Any) -> Command:
    """Rank 0 passes its command; every other rank passes None and receives it."""
    box = [command]
    dist.broadcast_object_list(box, src=0, group=control_group)
    return box[0]


def follow(engine: Engine, control_group: Any, config: ServeConfig) -> None:
    """Non-zero ranks: execute rank 0's commands until it says stop."""
    while True:
        command = broadcast_command(None, control_group)
        if isinstance(command, Stop):
            return
        execute(engine, command, control_group, config)


def tokens_by_request(batches: tuple[tuple[Request, ...], ...], gathered: list[Any]) -> dict[int, list[int]]:
    """Map each request object (by ``id()``) of ``batches`` to its tokens, from the leaders' ``RunResult``s."""
    out: dict[int, list[int]] = {}
    for result, _ in gathered:
        if result is None:
            continue
        bucket = batches[result.dp_index]
        if len(result.tokens) != len(bucket):
            raise RuntimeError(f"replica {result.dp_index} answered {len(result.tokens)} rows for a batch of "
                               f"{len(bucket)}; the ranks disagree on the batch")
        for request, tokens in zip(bucket, result.tokens):
            out[id(request)] = list(tokens)
    return out
