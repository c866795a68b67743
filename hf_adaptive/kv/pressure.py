"""Pressure sources: where the KV cache learns how close it is to its memory limit.

Contract: one :class:`PressureSource` interface, ``read(projected_kv_bytes) -> PressureReading``, called
ONCE per forward step by the cache (when layer 0 is updated) so every layer agrees on the decision.
``fraction`` is dimensionless: 1.0 means exactly at the limit. Sources never touch the cache's tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from hf_adaptive.units import parse_bytes
from hf_adaptive.validation import check_number, check_type

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
        # flat fields of plain values: no deep copy (this runs once per decode step, in the cache's history)
        return {"fraction": self.fraction, "source": self.source, "used_bytes": self.used_bytes,
                "limit_bytes": self.limit_bytes}


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

    def __init__(self, budget_bytes: int | str):
        self.budget_bytes = parse_bytes(budget_bytes, "budget_bytes")  # > 0: it divides every reading

    def read(self, projected_kv_bytes: int) -> PressureReading:
        return PressureReading(projected_kv_bytes / self.budget_bytes, "budget", projected_kv_bytes,
                               self.budget_bytes)


class GPUMemoryPressure:
    """Device memory in use vs ``target_fraction`` of what this process may use; the tighter of two limits.

    - the card: ``torch.cuda.mem_get_info`` (all processes) vs ``target_fraction`` of the card's total;
    - this process's allocator cap (``torch.cuda.set_per_process_memory_fraction``, which ``mem_get_info`` does
      not know about): bytes RESERVED by this process's caching allocator (the cap limits reserved memory, so
      fragmentation counts: with 4.5 GiB allocated, 6 GiB reserved hit a 6 GiB cap on an H100) vs
      ``target_fraction`` of the cap.
    Both are host-side queries (no stream sync); ``every_n_reads`` > 1 reuses the last reading in between.

    Args:
        target_fraction: stay below this fraction of each limit, in (0, 1].
        device: the CUDA device (default: current).
        every_n_reads: query every n-th read only.
        process_fraction: the per-process cap as a fraction of the card; None reads it from torch
            (``torch.cuda.get_per_process_memory_fraction``, 1.0 where that API is missing).
    """

    def __init__(self, target_fraction: float = 0.9, device: int | str | torch.device | None = None,
                 every_n_reads: int = 1, process_fraction: float | None = None):
        check_number(target_fraction, "target_fraction", minimum=0.0, maximum=1.0, min_open=True,
                     fix="target_fraction=0.9")
        check_number(every_n_reads, "every_n_reads", minimum=1, integer=True, fix="every_n_reads=1")
        if process_fraction is not None:
            check_number(process_fraction, "process_fraction", minimum=0.0, maximum=1.0, min_open=True,
                         fix="process_fraction=None (read it from torch)")
        if not torch.cuda.is_available():
            raise ValueError("GPUMemoryPressure needs CUDA, which is not available here; got "
                             f"gpu_memory_fraction={target_fraction!r}. Fix: use memory_budget='2GiB' instead.")
        self.target_fraction = float(target_fraction)
        self.device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        self.every_n_reads = every_n_reads
        self.process_fraction = process_fraction
        self._reads = 0
        self._last: PressureReading | None = None

    def read(self, projected_kv_bytes: int) -> PressureReading:
        self._reads += 1
        if self._last is None or self._reads % self.every_n_reads == 0:
            free_bytes, total_bytes = torch.cuda.mem_get_info(self.device)
            reserved = torch.cuda.memory_reserved(self.device)
            self._last = gpu_reading(free_bytes, total_bytes, reserved, self.target_fraction,
                                     self._process_fraction())
        return self._last

    def _process_fraction(self) -> float:
        if self.process_fraction is not None:
            return float(self.process_fraction)
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        return float(getter(self.device)) if getter is not None else 1.0


def gpu_reading(free_bytes: int, total_bytes: int, allocated_bytes: int, target_fraction: float,
                process_fraction: float = 1.0) -> PressureReading:
    """Pure pressure arithmetic of :class:`GPUMemoryPressure` (unit-testable with injected numbers).

    Returns the reading of the tighter limit: card-wide ``(total - free) / (target * total)`` or this
    process's ``allocated / (target * process_fraction * total)``, where ``allocated_bytes`` is what counts
    against the cap (the caller passes the allocator's reserved bytes).
    """
    card_limit = int(total_bytes * target_fraction)
    card = PressureReading((total_bytes - free_bytes) / card_limit, "gpu", total_bytes - free_bytes, card_limit)
    if process_fraction >= 1.0:
        return card
    process_limit = int(total_bytes * process_fraction * target_fraction)
    process = PressureReading(allocated_bytes / process_limit, "gpu_process_cap", allocated_bytes, process_limit)
    return process if process.fraction >= card.fraction else card


class ScriptedPressure:
    """Replays a list of fractions, one per read; the last one repeats. For tests and demos."""

    def __init__(self, fractions: list[float]):
        check_type(fractions, "fractions", (list, tuple), "ScriptedPressure([0.0, 0.5, 0.9])")
        if not fractions:
            raise ValueError("ScriptedPressure needs at least one fraction; got an empty list. Fix: e.g. [0.0].")
        self.fractions = [float(check_number(f, f"fractions[{i}]", minimum=0.0, fix="0.9"))
                          for i, f in enumerate(fractions)]
        self._index = 0

    def read(self, projected_kv_bytes: int) -> PressureReading:
        fraction = self.fractions[min(self._index, len(self.fractions) - 1)]
        self._index += 1
        return PressureReading(fraction, "scripted", projected_kv_bytes, None)
