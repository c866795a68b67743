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
a switch cost, the device memory and a ``meta`` block naming where it was measured.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from hf_adaptive.parallel.capacity import ReplicaMemory
from hf_adaptive.policy.parallel_policy import WorkloadSummary


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

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        raw = json.loads(Path(path).read_text())
        required = {f.name for f in fields(PlanCost) if f.default is MISSING}
        names = {f.name for f in fields(PlanCost)}
        plans = {}
        for plan, coeffs in raw["plans"].items():
            missing = required - set(coeffs)
            if missing:
                raise ValueError(f"{path}: plan {plan!r} lacks {sorted(missing)}; re-run eval/calibrate_parallel.py")
            plans[plan] = PlanCost(**{k: float(coeffs[k]) for k in names & set(coeffs)})
        return cls(world_size=int(raw["world_size"]), device_memory_bytes=float(raw["device_memory_bytes"]),
                   switch_cost_ms=float(raw["switch_cost_ms"]), plans=plans, meta=raw.get("meta", {}),
                   memory_headroom=float(raw.get("memory_headroom", 0.0)))

    def free_bytes(self, plan_name: str) -> float:
        """What admission may fill per device on ``plan_name``: the budget less headroom, less the weights."""
        return self.device_memory_bytes * (1 - self.memory_headroom) - self.cost(plan_name).weights_bytes_per_device

    def cost(self, plan_name: str) -> PlanCost:
        if plan_name not in self.plans:
            raise ValueError(f"plan {plan_name!r} is not in the calibration (has {sorted(self.plans)}); "
                             f"calibrate it or pick one of those")
        return self.plans[plan_name]


def queue_drain_predictor(calib: Calibration, plan_for: Callable[[str], Any], max_batch_per_replica: int,
                          head_requests: int = 0) -> Callable[[str, WorkloadSummary], float | None]:
    """``predict_s(strategy, summary)`` for ``cost_aware_rule``: seconds to serve the live queue FIFO in
    batches of ``max_batch_per_replica`` per replica, or None when a batch does not fit the plan's memory.

    ``head_requests`` > 0 prices only the next that many queued requests (the work the next batches run, as the
    default rule's ``queue_head_requests``). Pricing the whole queue makes a plan that cannot hold some request far
    back (DP and a long document behind a chat backlog) "unable to serve", so the rule leaves it long before
    that request is reached. Memory is checked as admission checks it: the plan's ``replica_memory`` against
    ``free_bytes`` (budget less headroom, less weights).
    """
    if head_requests < 0:
        raise ValueError(f"head_requests must be >= 0 (0: the whole queue), got {head_requests}")

    def predict_s(strategy: str, summary: WorkloadSummary) -> float | None:
        plan = plan_for(strategy)
        if plan.name not in calib.plans:
            return None
        cost, lens, news = calib.plans[plan.name], summary.queue_seq_lens, summary.queue_new_tokens
        news = news if len(news) == len(lens) else (0,) * len(lens)
        if head_requests:
            lens, news = lens[:head_requests], news[:head_requests]
        memory, free = cost.replica_memory(), calib.free_bytes(plan.name)
        step, total_ms = max_batch_per_replica * plan.dp, 0.0
        for i in range(0, len(lens), step):
            rows = math.ceil(len(lens[i:i + step]) / plan.dp)  # replicas run side by side
            width, new = max(lens[i:i + step]), max(news[i:i + step])
            if memory.batch_bytes(rows, width - new, new) > free:
                return None
            total_ms += cost.batch_ms(rows, width - new, new)
        return total_ms / 1e3

    return predict_s
