"""Memory-aware admission: how many queued requests the next batch may take so every replica fits its devices.

Contract: pure (no torch). ``ReplicaMemory.for_plan(config, plan, dtype_bytes)`` is the analytic per-device
cost of one replica's batch under a plan, from the model config; ``admit(queue, plan, free_bytes, memory,
max_rows_per_replica)`` returns how many requests from the head of the FIFO queue the next batch takes (the
router then splits them over the replicas exactly as it will at run time).

Per device, a batch of ``B`` rows left-padded to ``W`` prompt tokens generating ``G`` tokens needs

    B * (W + G) * kv_bytes_per_token           the KV cache of the device's layers and KV heads
  + B * W * prefill_bytes_per_token            the widest layer's activations during the prefill
  + B * W * W * mask_bytes                     the (B, 1, W, W) boolean padding mask of the prefill

on top of the weights, which the engine measures after each re-shard (``free_bytes`` is the budget left).
Why it matters: a replica holding all the weights (DP) has the least room for long documents; without this,
a batch of them would run out of memory, and with it DP runs them in smaller batches, which the parallelism
policy then weighs against the model-splitting plans.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hf_adaptive.parallel.plans import ParallelPlan
from hf_adaptive.validation import check_number


@dataclass(frozen=True)
class ReplicaMemory:
    """Bytes per device of one replica's batch, per token (see the module docstring)."""

    kv_bytes_per_token: float
    prefill_bytes_per_token: float
    mask_bytes: float = 1.0

    def __post_init__(self) -> None:
        for name in ("kv_bytes_per_token", "prefill_bytes_per_token", "mask_bytes"):  # NaN would admit everything
            check_number(getattr(self, name), f"ReplicaMemory.{name}", minimum=0.0, fix=f"{name}=1024.0")

    def batch_bytes(self, rows: int, prompt_width: int, new_tokens: int) -> float:
        """Per-device bytes of ``rows`` sequences padded to ``prompt_width`` generating ``new_tokens``."""
        w = prompt_width
        return rows * ((w + new_tokens) * self.kv_bytes_per_token + w * self.prefill_bytes_per_token
                       + w * w * self.mask_bytes)

    @classmethod
    def for_plan(cls, config: Any, plan: ParallelPlan, dtype_bytes: int) -> ReplicaMemory:
        """The busiest device of ``plan`` for a transformers decoder config (``text_config`` if nested).

        KV: 2 (keys, values) x the stage's layers (largest stage) x the rank's KV heads (largest share) x head
        dim. Prefill activations: the hidden states a decoder layer keeps alive (residual, normed input,
        attention output: 3 x hidden), the rank's q/k/v, and its MLP gate, up and their product (3 x
        intermediate / tp), all in ``dtype_bytes``.
        """
        text = getattr(config, "text_config", None) or config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        layers = math.ceil(text.num_hidden_layers / plan.pp)
        kv_rank = math.ceil(kv_heads / plan.tp)
        q_rank = kv_rank * (heads // kv_heads)
        kv = 2 * layers * kv_rank * head_dim * dtype_bytes
        act = (3 * text.hidden_size + (q_rank + 2 * kv_rank) * head_dim
               + 3 * math.ceil(text.intermediate_size / plan.tp)) * dtype_bytes
        return cls(kv_bytes_per_token=kv, prefill_bytes_per_token=act)


BATCH_CAP_SCOPES = ("replica", "device")


def replica_rows(plan: ParallelPlan, max_batch: int, per: str = "replica") -> int:
    """The row cap of one replica of ``plan`` in a batch.

    ``per="replica"``: ``max_batch`` rows per replica, so a DP plan of ``n`` replicas runs ``n * max_batch`` rows at
    once where TP or PP over the same devices runs ``max_batch`` (one engine per replica, as serving engines cap
    sequences per engine). ``per="device"``: ``max_batch`` rows per device the replica spans (``tp * pp``), so
    every plan may run ``max_batch * world_size`` rows at once and plans are compared at equal concurrency;
    memory admission (``admit``) still lowers either cap.
    """
    if per not in BATCH_CAP_SCOPES:
        raise ValueError(f"the batch cap's scope (batch_cap_per, --max-batch-per) must be one of {BATCH_CAP_SCOPES}, "
                         f"got {per!r}")
    check_number(max_batch, "the batch cap (max_batch_per_replica, --max-batch)", minimum=1, integer=True,
                 fix="--max-batch 8")
    return max_batch * (plan.tp * plan.pp if per == "device" else 1)


def admit(queue: Sequence[Any], plan: ParallelPlan, free_bytes: float, memory: ReplicaMemory,
          max_rows_per_replica: int, router: Callable[[Sequence[Any], int], list[list[Any]]],
          prompt_len: Callable[[Any], int] = lambda r: len(r.prompt_ids)) -> tuple[int, bool]:
    """``(n, fits)``: the next batch takes the first ``n`` queued requests.

    ``n`` is the largest count up to ``max_rows_per_replica * plan.dp`` for which every replica's share (as
    ``router(requests, plan.dp)`` assigns it) fits ``free_bytes`` on its devices. Items need
    ``prompt_len(item)`` (default ``len(item.prompt_ids)``) and ``item.max_new_tokens``. When not even the
    first request fits alone, returns ``(1, False)``: the caller decides (a layout with more room, or a refusal).
    """
    check_number(max_rows_per_replica, "max_rows_per_replica", minimum=1, integer=True, fix="max_rows_per_replica=8")
    if not queue:
        return 0, True
    limit = min(len(queue), max_rows_per_replica * plan.dp)
    for n in range(limit, 0, -1):
        shares = router(queue[:n], plan.dp)
        if all(memory.batch_bytes(len(s), max(prompt_len(r) for r in s), max(r.max_new_tokens for r in s))
               <= free_bytes for s in shares if s):
            return n, True
    return 1, False
