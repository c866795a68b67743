"""The per-call options of the graph-engine decode loops: one type for all three.

Contract: ``DecodeOptions`` says how one call of ``decode.decode``, ``FusedStepDecoder.generate`` or
``verified.generate_verified`` picks its tiers and tokens; ``DraftOptions`` (``DecodeOptions.draft``) holds the
settings only verified mode reads, and the record of what it did. Both validate in ``__post_init__``: a bad
field fails at construction with its name, the value received and a fix. A loop that cannot honour a field
refuses it by name (``DecodeOptions.refuse``) instead of ignoring it.

This is not ``GraphDecodeConfig``: that one fixes the engine's shapes at capture time (batch size, cache
length, verify width) and lives as long as the engine; these change from call to call.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from hf_adaptive.policy.precision_policy import PrecisionPolicyConfig
from hf_adaptive.precision.confidence import ConfidenceWeights
from hf_adaptive.precision.controller import PrecisionController
from hf_adaptive.precision.telemetry import PrecisionTelemetry
from hf_adaptive.validation import check_choice, check_number, check_type


@dataclass
class DraftOptions:
    """Verified mode: the fast tier drafts, the top tier verifies (see ``verified.py``).

    The engine must be built with ``GraphDecodeConfig(verify_len=max_draft + 1)``. ``telemetry``, ``history``
    and ``tie_rounds`` are the record ``generate_verified`` fills in; they accumulate over calls until cleared.
    """

    max_draft: int = 4
    policy: PrecisionPolicyConfig = field(default_factory=PrecisionPolicyConfig)
    weights: ConfidenceWeights = field(default_factory=ConfidenceWeights)
    tier: str | None = None  # the drafting tier; None: the engine's cheapest tier
    adaptive: bool = True    # False: draft max_draft every round (QSpec-style), ignoring confidence
    # verify rows whose top-2 logit gap is <= this many rounding steps of the logits' dtype are re-decided by a
    # 1-token top-tier forward (0: never); ``tie_rounds`` counts the rounds that did
    tie_margin_steps: float = 2.0
    telemetry: PrecisionTelemetry = field(default_factory=PrecisionTelemetry)
    history: list[tuple[int, int]] = field(default_factory=list)  # per round: (drafted k, accepted)
    tie_rounds: int = 0

    def __post_init__(self) -> None:
        check_number(self.max_draft, "DraftOptions.max_draft", minimum=1, integer=True, fix="max_draft=4")
        check_type(self.policy, "DraftOptions.policy", PrecisionPolicyConfig,
                   "policy=default_policy_config(tiers)")
        check_type(self.weights, "DraftOptions.weights", ConfidenceWeights, "weights=ConfidenceWeights()")
        check_type(self.tier, "DraftOptions.tier", (str, type(None)), "tier='int4' or tier=None (cheapest)")
        check_type(self.adaptive, "DraftOptions.adaptive", bool, "adaptive=True")
        check_number(self.tie_margin_steps, "DraftOptions.tie_margin_steps", minimum=0, fix="tie_margin_steps=2.0")
        check_type(self.telemetry, "DraftOptions.telemetry", PrecisionTelemetry, "telemetry=PrecisionTelemetry()")

    def clear_record(self) -> None:
        """Forget the rounds and near-tie count of earlier calls (the telemetry keeps its own ``reset``)."""
        self.history.clear()
        self.tie_rounds = 0


@dataclass
class DecodeOptions:
    """How one decode call picks its tiers and tokens.

    The tier of each step comes from the ``controller``, a ``schedule`` (tier names replayed cyclically, for
    benchmarks) or the fixed ``tier`` (None: the top tier). Given a controller and a schedule,
    ``decode.decode`` follows the controller, while ``FusedStepDecoder.generate`` replays the schedule and
    still has the controller read every step (the controller's real cost on a recorded schedule). What each
    loop honours: ``decode.decode`` every field but ``draft``; ``FusedStepDecoder.generate`` is greedy (no
    ``do_sample``, ``agreement_every`` or ``draft``); ``generate_verified`` needs ``draft`` and takes no tier
    source (no ``controller``, ``schedule``, ``tier`` or sampling).

    Args:
        max_new_tokens: tokens each call returns (exactly: no EOS stop, which would cost a host sync per step).
        controller: decides each step's tier from the step before.
        schedule: tier names replayed cyclically.
        tier: the fixed tier when neither of the above is given.
        do_sample: sample (the exponential race) instead of greedy.
        temperature: sampling temperature (> 0).
        generator: the sampling RNG.
        agreement_every: every N-th low-tier step also runs the top tier and records whether both agree.
        decision_lag: 0 decides from the step just run; 1 from the one before, so the host never waits.
        draft: verified mode's settings and record.
    """

    max_new_tokens: int = 32
    controller: PrecisionController | None = None
    schedule: tuple[str, ...] | None = None
    tier: str | None = None
    do_sample: bool = False
    temperature: float = 1.0
    generator: torch.Generator | None = None
    agreement_every: int = 0
    decision_lag: int = 0
    draft: DraftOptions | None = None

    def __post_init__(self) -> None:
        check_number(self.max_new_tokens, "DecodeOptions.max_new_tokens", minimum=1, integer=True,
                     fix="max_new_tokens=32")
        check_type(self.controller, "DecodeOptions.controller", (PrecisionController, type(None)),
                   "controller=PrecisionController(tiers)")
        self._check_schedule()
        check_type(self.tier, "DecodeOptions.tier", (str, type(None)), "tier='int4' or tier=None (top tier)")
        check_type(self.do_sample, "DecodeOptions.do_sample", bool, "do_sample=False")
        check_number(self.temperature, "DecodeOptions.temperature", minimum=0, min_open=True, fix="temperature=1.0")
        check_type(self.generator, "DecodeOptions.generator", (torch.Generator, type(None)),
                   "generator=torch.Generator().manual_seed(0)")
        check_number(self.agreement_every, "DecodeOptions.agreement_every", minimum=0, integer=True,
                     fix="agreement_every=8 (0: never)")
        check_choice(self.decision_lag, "DecodeOptions.decision_lag", (0, 1),
                     "decision_lag=0 (decide from the step just run, one wait) or 1 (never wait)")
        check_type(self.draft, "DecodeOptions.draft", (DraftOptions, type(None)), "draft=DraftOptions(max_draft=4)")

    def _check_schedule(self) -> None:
        if self.schedule is None:
            return
        if not isinstance(self.schedule, (tuple, list)) or not self.schedule \
                or not all(isinstance(t, str) for t in self.schedule):
            raise TypeError(f"DecodeOptions.schedule must be a non-empty tuple of tier names or None; got "
                            f"{self.schedule!r}. Fix: schedule=('int4', 'native')")

    def refuse(self, caller: str, names: tuple[str, ...], fix: str) -> None:
        """Raise one ValueError naming the first field of ``names`` set away from its default: ``caller``
        cannot honour it, and ``fix`` says which loop can."""
        defaults = {f.name: f.default for f in fields(self)}
        for name in names:
            value = getattr(self, name)
            if value != defaults[name]:
                raise ValueError(f"{caller}: DecodeOptions.{name} must be {defaults[name]!r} here; got "
                                 f"{value!r}. Fix: {fix}")


# ``hf_adaptive.FusedOptions`` is public API: the fused loop's options are these options
FusedOptions = DecodeOptions
