"""The multi-process greedy-generation engine for one ``ParallelPlan``.

Contract: every rank of the world calls the same methods in the same order (SPMD). The engine owns
the process groups of each plan (created once, up front, since ``new_group`` is collective), the
rank's current ``Shard``, and the greedy loop:

    first stage: embed -> its layers -> send to the next stage (same tp_rank)
    middle stage: recv -> its layers -> send
    last stage: recv -> its layers + norm -> lm_head -> argmax -> broadcast the token to the replica

It knows nothing about requests or scheduling (``serve.py``) or which plan to pick (the policy).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import DynamicCache

from hf_adaptive.compat import cache_kwarg_name
from hf_adaptive.parallel.plans import ParallelPlan
from hf_adaptive.parallel.shard import Shard, build_shard, pin_host_copy

logger = logging.getLogger(__name__)


@dataclass
class PlanGroups:
    """This rank's process groups under one plan."""

    tp: Any = None  # ranks of the same (replica, stage)
    pipe: Any = None  # ranks of the same (replica, tp_rank), across stages
    pipe_ranks: tuple[int, ...] = ()


def create_plan_groups(plans: list[ParallelPlan], rank: int) -> dict[str, PlanGroups]:
    """Create the TP and pipeline groups of every plan; collective, so all ranks call it identically."""
    out: dict[str, PlanGroups] = {}
    for plan in plans:
        groups = PlanGroups()
        for dp_index in range(plan.dp):
            for stage in range(plan.pp):
                ranks = [plan.rank_of(dp_index, stage, t) for t in range(plan.tp)]
                group = dist.new_group(ranks) if plan.tp > 1 else None
                if rank in ranks:
                    groups.tp = group
            for t in range(plan.tp):
                ranks = [plan.rank_of(dp_index, s, t) for s in range(plan.pp)]
                group = dist.new_group(ranks) if plan.pp > 1 else None
                if rank in ranks:
                    groups.pipe, groups.pipe_ranks = group, tuple(ranks)
        out[plan.name] = groups
    return out


@dataclass
class Engine:
    """Holds the host copy of the weights and this rank's shard of the current plan.

    ``pin_host``: on a CUDA device, page-lock the host copy at construction (``pin_host_copy``), so a re-shard
    copies at full link speed; it costs one pass over the weights and that much page-locked host memory per rank.
    """

    host_model: nn.Module
    rank: int
    world_size: int
    device: torch.device
    plans: list[ParallelPlan]
    groups: dict[str, PlanGroups] = field(default_factory=dict)
    shard: Shard | None = None
    pin_host: bool = True
    pinned_bytes: int = field(default=0, init=False)  # the page-locked host buffer, once ``pin`` succeeded

    def __post_init__(self) -> None:
        self.host_model.eval()
        self.groups = create_plan_groups(self.plans, self.rank)
        self._cache_kw = cache_kwarg_name(self.host_model.model.forward)
        if self.pin_host and self.device.type == "cuda":
            self.pin()

    def pin(self) -> float:
        """Page-lock the host copy (once; a no-op off CUDA or when done); returns the seconds it took."""
        if self.pinned_bytes or self.device.type != "cuda":
            return 0.0
        start = time.perf_counter()
        try:
            self.pinned_bytes = pin_host_copy(self.host_model)
        except RuntimeError as err:  # page-locked memory is scarcer than RAM: serve on, with slower re-shards
            logger.warning("could not page-lock the host copy (%s); re-shards read pageable memory, about 5x "
                           "slower (pass --no-pin-host to skip the attempt)", str(err).splitlines()[0])
            return 0.0
        seconds = time.perf_counter() - start
        logger.info("host copy page-locked: %.2f GiB in %.1fs", self.pinned_bytes / 2**30, seconds)
        return seconds

    @property
    def plan(self) -> ParallelPlan | None:
        return None if self.shard is None else self.shard.plan

    def reshard(self, plan: ParallelPlan) -> float:
        """Switch to ``plan`` from the host copy, without restarting; returns the seconds it took here."""
        if plan.name not in self.groups:
            raise ValueError(f"plan must be one of {[p.name for p in self.plans]}, got {plan.name}; "
                             f"list it in Engine(plans=...)")
        start = time.perf_counter()
        self.shard = None  # drop the old shard before building the new one: peak memory stays one shard
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.shard = build_shard(self.host_model, plan, self.rank, self.device, self.groups[plan.name].tp)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies are asynchronous: the cost includes them
        dist.barrier()
        return time.perf_counter() - start

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy-decode a left-padded batch on this rank's replica; all its ranks call it alike.

        Args:
            input_ids: ``(B, T)`` prompt tokens, left-padded.
            attention_mask: ``(B, T)``, 1 for real tokens.
            max_new_tokens: tokens to generate per row.
            eos_token_id: stop a row at this token (later positions repeat it); None never stops.

        Returns:
            ``(B, n)`` generated tokens, ``n <= max_new_tokens`` (fewer when every row hit EOS), on CPU.
        """
        shard = self.shard
        assert shard is not None, "reshard() before generate()"
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)  # same positions as HF generate
        cache = DynamicCache(config=shard.model.config)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        out = []
        for _ in range(max_new_tokens):
            token = self._step(ids, mask, positions, cache)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
            out.append(token)
            ids, positions = token[:, None], positions[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            # One host sync per token, only when early stopping is on: every rank must agree to stop.
            if eos_token_id is not None and bool(finished.all()):
                break
        return torch.stack(out, dim=1).cpu()

    @torch.inference_mode()
    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """One full forward (no cache) through the pipeline: ``(B, T, V)`` logits on last-stage ranks, else None."""
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.shard.model.config)
        hidden = self._stage_forward(ids, mask, positions, cache)
        return None if hidden is None else self.shard.model.lm_head(hidden)

    def _stage_forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                       cache: Any) -> torch.Tensor | None:
        """This stage's layers: ``(B, t, H)`` final hidden states on the last stage, None elsewhere."""
        shard, groups = self.shard, self.groups[self.shard.plan.name]
        model = shard.model
        if shard.is_first:
            hidden = model.model.embed_tokens(ids)  # (B, t, H)
        else:
            hidden_size = model.config.get_text_config().hidden_size
            hidden = torch.empty(*ids.shape, hidden_size, dtype=model.dtype, device=self.device)
            dist.recv(hidden, src=groups.pipe_ranks[shard.stage - 1], group=groups.pipe)
        hidden = model.model(inputs_embeds=hidden, attention_mask=mask, position_ids=positions,
                             use_cache=True, **{self._cache_kw: cache}).last_hidden_state
        if shard.is_last:
            return hidden
        dist.send(hidden.contiguous(), dst=groups.pipe_ranks[shard.stage + 1], group=groups.pipe)
        return None

    def _step(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        hidden = self._stage_forward(ids, mask, positions, cache)
        if hidden is None:
            token = torch.empty(ids.shape[0], dtype=torch.long, device=self.device)
        else:
            token = self.shard.model.lm_head(hidden[:, -1]).argmax(dim=-1)  # (B,)
        if self.shard.plan.pp > 1:
            groups = self.groups[self.shard.plan.name]
            dist.broadcast(token, src=groups.pipe_ranks[-1], group=groups.pipe)
        return token
