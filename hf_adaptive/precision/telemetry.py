"""What the precision switcher did: tier usage, switches, confidences, overhead, confidence accuracy.

Contract: mechanisms call ``record_step`` once per decode step (the controller's own host time, and apart from it
the time its one host read waited for the device: ``read_with_wait`` measures that read) and ``record_agreement`` whenever they
know whether a low-tier token equals the top tier's choice (every drafted token in verified mode,
sampled steps in lossy mode). ``report()`` is JSON-serializable; ``plot(path)`` writes a PNG. Plain
Python numbers only (no torch), so recording never touches the device.
"""

from __future__ import annotations

import json
from collections import Counter
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

N_BUCKETS = 10


def read_with_wait(read: Callable[[], T]) -> tuple[T, int]:
    """Run a host read (``tensor.tolist()``, an event wait) and return (its result, nanoseconds it took).

    On CUDA the read blocks until the step's queued kernels finish: that wait is the device's time, not the
    controller's, so callers subtract it from their overhead and record it as ``wait_ns``.
    """
    start = time.perf_counter_ns()
    out = read()
    return out, time.perf_counter_ns() - start


def _micros(ns: list[int]) -> dict[str, float]:
    """mean / p50 / max of nanosecond samples, in µs (zeros when empty)."""
    over = sorted(ns)
    if not over:
        return {"mean": 0.0, "p50": 0.0, "max": 0.0}
    return {"mean": sum(over) / len(over) / 1e3, "p50": over[len(over) // 2] / 1e3, "max": over[-1] / 1e3}


def _bucket(score: float) -> int:
    return min(N_BUCKETS - 1, max(0, int(score * N_BUCKETS)))


@dataclass
class PrecisionTelemetry:
    """Accumulates per-step records; one object per generation run (or ``reset()`` between runs)."""

    tiers: list[str] = field(default_factory=list)        # tier that ran each step's forward
    scores: list[float] = field(default_factory=list)     # every per-sequence confidence seen
    overhead_ns: list[int] = field(default_factory=list)  # controller's own host time per step (waits excluded)
    wait_ns: list[int] = field(default_factory=list)      # time its host read waited for the device per step
    queue_ns: list[int] = field(default_factory=list)     # the part of overhead_ns spent queueing the scores' copy
    switches: int = 0
    eager_score_steps: int = 0  # steps whose score the controller computed from the scores, outside the forward
    agree: list[int] = field(default_factory=lambda: [0] * N_BUCKETS)
    checked: list[int] = field(default_factory=lambda: [0] * N_BUCKETS)

    def reset(self) -> None:
        self.__init__()

    def record_step(self, tier: str, scores: list[float], overhead_ns: int = 0, wait_ns: int = 0,
                    queue_ns: int = 0) -> None:
        """One decode step: the tier its forward ran in, the confidences it produced, the controller's own host
        time, the part of it spent queueing the scores' copy (a controller that decides later, when the next
        forward's inputs are prepared, splits its time in two halves; the queue half overlaps the device's work)
        and, apart, the time its host read waited for the device."""
        if not 0 <= queue_ns <= max(overhead_ns, 0):
            raise ValueError(f"PrecisionTelemetry.record_step: queue_ns must be within [0, overhead_ns="
                             f"{overhead_ns}], got {queue_ns}; pass the queue half of the step's own host time")
        if self.tiers and self.tiers[-1] != tier:
            self.switches += 1
        self.tiers.append(tier)
        self.scores.extend(scores)
        self.overhead_ns.append(int(overhead_ns))
        self.wait_ns.append(int(wait_ns))
        self.queue_ns.append(int(queue_ns))

    def record_agreement(self, score: float, agreed: bool) -> None:
        """A low-tier token was compared with the top tier's; ``score`` is the low tier's confidence."""
        b = _bucket(score)
        self.checked[b] += 1
        self.agree[b] += int(agreed)

    def report(self) -> dict:
        """JSON-serializable summary (fractions in [0, 1], times in µs). ``controller_overhead_us`` is the
        controller's own host time per step; ``controller_queue_us`` the part of it spent queueing the scores' copy
        (in ``LogitsProcessor.__call__``), the rest deciding (``controller_decide_us``); ``host_read_wait_us`` the
        time its host read waited for the device; ``eager_score_steps`` the steps whose confidence no forward
        computed, so the controller computed it from the processed scores (eager kernels; 0 in compiled generate
        with a tiered head)."""
        n = len(self.tiers)
        counts = Counter(self.tiers)
        hist = [0] * N_BUCKETS
        for s in self.scores:
            hist[_bucket(s)] += 1
        return {
            "steps": n,
            "tier_steps": dict(counts),
            "tier_fraction": {t: c / n for t, c in counts.items()} if n else {},
            "switches": self.switches,
            "confidence_histogram": {"bucket_edges": [i / N_BUCKETS for i in range(N_BUCKETS + 1)],
                                     "counts": hist},
            "controller_overhead_us": _micros(self.overhead_ns),
            "controller_queue_us": _micros(self.queue_ns),
            "controller_decide_us": _micros([o - q for o, q in zip(self.overhead_ns, self.queue_ns)]),
            "host_read_wait_us": _micros(self.wait_ns),
            "eager_score_steps": self.eager_score_steps,
            "confidence_accuracy": [
                {"bucket": [i / N_BUCKETS, (i + 1) / N_BUCKETS], "checked": c,
                 "agree_fraction": (a / c) if c else None}
                for i, (a, c) in enumerate(zip(self.agree, self.checked))
            ],
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.report(), indent=2))

    def plot(self, path: str | Path, title: str = "precision switching") -> None:
        """Three panels: tier usage, confidence histogram, agreement with the top tier per bucket."""
        from hf_adaptive.evaluation.report import headless_pyplot, save_figure

        plt = headless_pyplot()
        rep = self.report()
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        tiers = sorted(rep["tier_fraction"])
        axes[0].bar(tiers, [rep["tier_fraction"][t] for t in tiers], color="tab:blue")
        axes[0].set_title(f"tier usage ({rep['steps']} steps, {rep['switches']} switches)")
        centers = [(i + 0.5) / N_BUCKETS for i in range(N_BUCKETS)]
        axes[1].bar(centers, rep["confidence_histogram"]["counts"], width=0.09, color="tab:orange")
        axes[1].set_title("confidence histogram")
        axes[1].set_xlabel("confidence")
        acc = [b["agree_fraction"] if b["agree_fraction"] is not None else 0.0
               for b in rep["confidence_accuracy"]]
        axes[2].bar(centers, acc, width=0.09, color="tab:green")
        axes[2].set_ylim(0, 1.05)
        axes[2].set_title("low-tier token == top-tier token")
        axes[2].set_xlabel("confidence")
        fig.suptitle(title)
        save_figure(fig, path, dpi=110)
