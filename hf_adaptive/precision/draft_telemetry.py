"""What a draft cascade did: per drafter proposals, accepted tokens, acceptance rate, draft and verify time.

Contract: the cascade calls ``record_round`` once per verify forward (drafter ``"none"`` for a round that drafted
nothing). ``report()`` is JSON-serializable. Times are host clock (``time.perf_counter_ns``) around the draft and
the verify; on CUDA they include the wait of the one host read each round makes, on CPU they are the work itself.
Plain Python numbers only, so recording never touches the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DrafterStats:
    """Totals of one drafter over a generation."""

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0  # accepted drafts plus the verifier's own token, per round
    draft_ns: int = 0
    verify_ns: int = 0

    def report(self) -> dict:
        """JSON-serializable totals; ``acceptance_rate`` = accepted / proposed (None before any proposal)."""
        return {"rounds": self.rounds, "proposed": self.proposed, "accepted": self.accepted,
                "emitted": self.emitted,
                "acceptance_rate": self.accepted / self.proposed if self.proposed else None,
                "tokens_per_verify": self.emitted / self.rounds if self.rounds else None,
                "draft_ms": self.draft_ns / 1e6, "verify_ms": self.verify_ns / 1e6}


@dataclass(frozen=True)
class RoundRecord:
    """One draft + verify round: who drafted, how many tokens it proposed and how many the verifier kept."""

    drafter: str
    proposed: int
    accepted: int
    emitted: int
    score: float | None  # the confidence the policy decided from (None before the first verify)


@dataclass
class DraftTelemetry:
    """Per-drafter totals and the per-round history of one or more generations (``reset()`` between runs)."""

    drafters: dict[str, DrafterStats] = field(default_factory=dict)
    rounds: list[RoundRecord] = field(default_factory=list)

    def reset(self) -> None:
        """Forget every round."""
        self.drafters.clear()
        self.rounds.clear()

    def record_round(self, record: RoundRecord, draft_ns: int, verify_ns: int) -> None:
        """Add one round (its drafter's totals and the history)."""
        stats = self.drafters.setdefault(record.drafter, DrafterStats())
        stats.rounds += 1
        stats.proposed += record.proposed
        stats.accepted += record.accepted
        stats.emitted += record.emitted
        stats.draft_ns += int(draft_ns)
        stats.verify_ns += int(verify_ns)
        self.rounds.append(record)

    def report(self) -> dict:
        """JSON-serializable: per-drafter totals, overall acceptance, and the per-round history."""
        proposed = sum(s.proposed for s in self.drafters.values())
        accepted = sum(s.accepted for s in self.drafters.values())
        emitted = sum(s.emitted for s in self.drafters.values())
        return {
            "drafters": {name: s.report() for name, s in sorted(self.drafters.items())},
            "verify_forwards": len(self.rounds),
            "emitted_tokens": emitted,
            "acceptance_rate": accepted / proposed if proposed else None,
            "tokens_per_verify": emitted / len(self.rounds) if self.rounds else None,
            "rounds": [[r.drafter, r.proposed, r.accepted, r.emitted, r.score] for r in self.rounds],
            "rounds_columns": ["drafter", "proposed", "accepted", "emitted", "score"],
        }
