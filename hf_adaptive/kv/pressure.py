"""Pressure sources: where the KV cache learns how close it is to its memory limit.

Contract: one :class:`PressureSource` interface, ``read(projected_kv_bytes) -> PressureReading``, called
ONCE per forward step by the cache (when layer 0 is updated) so every layer agrees on the decision.
``fraction`` is dimensionless: 1.0 means exactly at the limit. Sources never touch the cache's tensors.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import torch

logger = logging.getLogger(__name__)


class KVBudgetExceededError(RuntimeError):
    """The KV cache is over its budget at the lowest rung with nothing left to demote."""


@dataclass(frozen=True)
class PressureReading:
    """One reading.

    Attributes:
        fraction: used / limit (1.0 = at the limit).
        source: name of the source ("budget", "gpu", "scripted", "none").
        used_bytes: bytes counted against the limit (None when the source has no byte notion).
        limit_bytes: the limit in bytes (None likewise).
    """

    fraction: float
    source: str
    used_bytes: int | None = None
    limit_bytes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class PressureSource(Protocol):
    """Anything with ``read(projected_kv_bytes: int) -> PressureReading``."""

    def read(self, projected_kv_bytes: int) -> PressureReading: ...


class NoPressure:
    """Always 0: the cache stays at 16 bits (lossless)."""

    def read(self, projected_kv_bytes: int) -> PressureReading:
        return PressureReading(0.0, "none", projected_kv_bytes, None)


class BudgetPressure:
    """Explicit KV byte budget: fraction = projected KV bytes (after this step's new tokens) / budget.

    Deterministic and device-independent (pure Python ints; no host sync).
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)

    def read(self, projected_kv_bytes: int) -> PressureReading:
        return PressureReading(projected_kv_bytes / self.budget_bytes, "budget", projected_kv_bytes,
                               self.budget_bytes)


class GPUMemoryPressure:
    """Device memory in use (``torch.cuda.mem_get_info``) vs ``target_fraction`` of the card's total.

    ``mem_get_info`` is a driver query (no stream sync, a few microseconds); ``every_n_reads`` > 1 reuses
    the last reading in between to keep the per-token path cheap.
    """

    def __init__(self, target_fraction: float = 0.9, device: int | str | torch.device | None = None,
                 every_n_reads: int = 1):
        if not torch.cuda.is_available():
            raise ValueError("GPUMemoryPressure needs CUDA, which is not available here; got "
                             f"gpu_memory_fraction={target_fraction!r}. Fix: use memory_budget='2GiB' instead.")
        self.target_fraction = float(target_fraction)
        self.device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        self.every_n_reads = max(int(every_n_reads), 1)
        self._reads = 0
        self._last: PressureReading | None = None

    def read(self, projected_kv_bytes: int) -> PressureReading:
        self._reads += 1
        if self._last is None or self._reads % self.every_n_reads == 0:
            free_bytes, total_bytes = torch.cuda.mem_get_info(self.device)
            limit = int(total_bytes * self.target_fraction)
            used = total_bytes - free_bytes
            self._last = PressureReading(used / limit, "gpu", used, limit)
        return self._last


class ScriptedPressure:
    """Replays a list of fractions, one per read; the last one repeats. For tests and demos."""

    def __init__(self, fractions: list[float]):
        if not fractions:
            raise ValueError("ScriptedPressure needs at least one fraction; got an empty list. Fix: e.g. [0.0].")
        self.fractions = [float(f) for f in fractions]
        self._index = 0

    def read(self, projected_kv_bytes: int) -> PressureReading:
        fraction = self.fractions[min(self._index, len(self.fractions) - 1)]
        self._index += 1
        return PressureReading(fraction, "scripted", projected_kv_bytes, None)
