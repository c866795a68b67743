"""Which precision the KV cache stores, given memory pressure: pure decisions, no torch.

Contract: numbers in, numbers out. A *pressure fraction* (1.0 = at the limit) goes in once per forward step;
a :class:`KVDecision` comes out: the precision for tokens leaving the exact window, and how many already
stored history blocks (per layer) may be demoted this step. The cache (mechanism) executes and records it.

The ladder is a tuple of :class:`Stage` with separate enter/exit thresholds (hysteresis). Escalation is
immediate (running out of memory is worse than a switch), de-escalation steps down one stage at a time and
only after ``cooldown_steps`` since the last switch, so an oscillating signal cannot make it thrash.
Lossy data is never promoted back: stepping down only changes the precision of *new* cold tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_adaptive.validation import check_choice, check_number, check_type

ALLOWED_BITS = (16, 8, 4, 2)


@dataclass(frozen=True)
class Stage:
    """One rung of the ladder.

    Attributes:
        bits: precision of tokens leaving the exact window (16 = model dtype, or 8/4/2).
        demote: whether stored history blocks above ``bits`` are demoted to ``bits`` (oldest first).
        enter_fraction: pressure at or above which this stage is entered.
        exit_fraction: pressure below which the policy steps back down from this stage.
    """

    bits: int
    demote: bool
    enter_fraction: float
    exit_fraction: float

    def __post_init__(self) -> None:
        check_choice(self.bits, "Stage.bits", ALLOWED_BITS, "Stage(8, False, 0.70, 0.60)")
        check_type(self.demote, "Stage.demote", bool, "Stage(4, True, 0.95, 0.88)")
        for name in ("enter_fraction", "exit_fraction"):
            check_number(getattr(self, name), f"Stage.{name}", minimum=0.0, fix="Stage(8, False, 0.70, 0.60)")


def default_stages() -> tuple[Stage, ...]:
    """16 bits; 8 bits from 70 % pressure; 4 bits from 85 %; 4 bits + demotion of stored blocks from 95 %."""
    return (Stage(16, False, 0.0, 0.0), Stage(8, False, 0.70, 0.60),
            Stage(4, False, 0.85, 0.75), Stage(4, True, 0.95, 0.88))


@dataclass(frozen=True)
class KVPolicyConfig:
    """Hysteresis ladder settings.

    Attributes:
        stages: the ladder, lowest pressure first; stage 0 must be 16 bits, entered at 0.
        cooldown_steps: forward steps after any switch before the policy may step down again.
        demote_blocks_per_step: history blocks per layer demoted per step while a ``demote`` stage holds.
    """

    stages: tuple[Stage, ...] = field(default_factory=default_stages)
    cooldown_steps: int = 8
    demote_blocks_per_step: int = 2

    def __post_init__(self) -> None:
        check_type(self.stages, "stages", (tuple, list), "stages=default_stages()")
        object.__setattr__(self, "stages", tuple(self.stages))
        for i, stage in enumerate(self.stages):
            check_type(stage, f"stages[{i}]", Stage, "Stage(8, False, 0.70, 0.60)")
        if not self.stages or self.stages[0].bits != 16 or self.stages[0].enter_fraction != 0.0:
            raise ValueError(f"stages[0] must be Stage(16, False, 0.0, 0.0) (store in the model dtype at no "
                             f"pressure); got {self.stages[:1]!r}. Fix: start the ladder with that stage.")
        for i, stage in enumerate(self.stages):
            _check_stage(i, stage, self.stages[i - 1] if i else None)
        check_number(self.cooldown_steps, "cooldown_steps", minimum=0, integer=True, fix="cooldown_steps=8")
        check_number(self.demote_blocks_per_step, "demote_blocks_per_step", minimum=1, integer=True,
                     fix="demote_blocks_per_step=2")


def _check_stage(i: int, stage: Stage, previous: Stage | None) -> None:
    if stage.bits not in ALLOWED_BITS:
        raise ValueError(f"stages[{i}].bits must be one of {ALLOWED_BITS}; got {stage.bits!r}. "
                         "Fix: use 16, 8, 4 or 2.")
    if previous is None:
        return
    if stage.bits > previous.bits:
        raise ValueError(f"stages[{i}].bits={stage.bits} is above stages[{i - 1}].bits={previous.bits}; "
                         "bits must not increase along the ladder. Fix: order stages by falling precision.")
    if not previous.enter_fraction < stage.enter_fraction:
        raise ValueError(f"stages[{i}].enter_fraction={stage.enter_fraction} must be above "
                         f"stages[{i - 1}].enter_fraction={previous.enter_fraction}. Fix: increasing thresholds.")
    if not 0.0 <= stage.exit_fraction < stage.enter_fraction:
        raise ValueError(f"stages[{i}].exit_fraction={stage.exit_fraction} must be in [0, enter_fraction="
                         f"{stage.enter_fraction}); the gap is the hysteresis. Fix: e.g. enter - 0.1.")


@dataclass(frozen=True)
class KVDecision:
    """What the cache does this step.

    Attributes:
        stage: index of the current stage in the ladder.
        bits: precision for tokens leaving the exact window.
        demote_blocks: max history blocks per layer to demote to ``bits`` this step (0 = none).
        switched: whether the stage changed at this step.
    """

    stage: int
    bits: int
    demote_blocks: int
    switched: bool


class HysteresisPolicy:
    """Stateful ladder walker; call :meth:`decide` once per forward step."""

    def __init__(self, config: KVPolicyConfig | None = None):
        self.config = check_type(config or KVPolicyConfig(), "config", KVPolicyConfig,
                                 "HysteresisPolicy(KVPolicyConfig())")
        self.reset()

    def reset(self) -> None:
        """Back to stage 0 with no cooldown pending."""
        self.stage = 0
        self._last_switch_step: int | None = None

    def decide(self, pressure_fraction: float, step: int) -> KVDecision:
        """Move along the ladder for one step's pressure reading and return the decision."""
        if not pressure_fraction >= 0:  # NaN or negative: no stage would match (a raw max() of nothing)
            raise ValueError(f"pressure fraction must be a number >= 0 (used / limit); got {pressure_fraction!r}. "
                             "Fix: the PressureSource must return PressureReading(fraction >= 0, ...).")
        stages, before = self.config.stages, self.stage
        target = max(i for i, s in enumerate(stages) if s.enter_fraction <= pressure_fraction)
        if target > self.stage:
            self.stage = target
        elif self.stage > 0 and pressure_fraction < stages[self.stage].exit_fraction and self._cooled(step):
            self.stage -= 1
        if self.stage != before:
            self._last_switch_step = step
        current = stages[self.stage]
        demote = self.config.demote_blocks_per_step if current.demote else 0
        return KVDecision(self.stage, current.bits, demote, self.stage != before)

    def _cooled(self, step: int) -> bool:
        last = self._last_switch_step
        return last is None or step - last >= self.config.cooldown_steps


class FixedBitsPolicy:
    """Always the same precision for tokens leaving the exact window; never demotes (deterministic evals)."""

    def __init__(self, bits: int):
        self.bits = check_choice(bits, "fixed_bits", ALLOWED_BITS, "fixed_bits=4")
        self.stage = 0

    def reset(self) -> None:
        """Nothing to forget."""

    def decide(self, pressure_fraction: float, step: int) -> KVDecision:
        return KVDecision(0, self.bits, 0, False)


def choose_demotions(block_bits: list[int], target_bits: int, max_blocks: int) -> list[int]:
    """Logical indices of the blocks to demote to ``target_bits``: the oldest ones stored above it.

    Args:
        block_bits: precision of each logical history block, oldest first.
        target_bits: precision to demote to.
        max_blocks: at most this many indices.
    Returns:
        Increasing logical block indices (oldest first).
    """
    chosen = [i for i, bits in enumerate(block_bits) if bits > target_bits]
    return chosen[:max(max_blocks, 0)]
