"""Which drafter proposes the next tokens of a draft cascade, and how many: a pure decision (no torch).

Contract: ``choose_draft(score, lookup_tokens, config)`` takes the top tier's confidence in the token it just
emitted (a float in [0, 1], or None before the first verify) and how many tokens a prompt-lookup match offers
(0: no match), and returns a ``DraftChoice`` (drafter name, draft length). Rules, in order:

1. a prompt-lookup match runs first: its drafts cost no forward, so confidence does not veto them; its length is
   ``min(lookup_tokens, max_lookup_tokens)``;
2. else the self-draft (the model's own int4 tier) runs with ``draft_length(score, max_self_draft, bands)`` tokens
   (the verified mode's band rule: full length above ``high``, half in the mid band, none below ``low``);
3. else nothing is drafted and the verifier decodes one token alone.

A drafter missing from ``config.drafters`` is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_adaptive.policy.precision_policy import PrecisionPolicyConfig, draft_length
from hf_adaptive.validation import check_number, check_type

DRAFTERS = ("lookup", "self")
NO_DRAFT = "none"


@dataclass(frozen=True)
class DraftPolicyConfig:
    """Drafters enabled, their length caps, and the confidence bands of the self-draft."""

    drafters: tuple[str, ...] = DRAFTERS
    max_lookup_tokens: int = 8
    max_self_draft: int = 4
    bands: PrecisionPolicyConfig = field(default_factory=PrecisionPolicyConfig)

    def __post_init__(self) -> None:
        bad = [d for d in self.drafters if d not in DRAFTERS]
        if not self.drafters or bad or len(set(self.drafters)) != len(self.drafters):
            raise ValueError(f"DraftPolicyConfig.drafters must be a non-empty subset of {DRAFTERS} without repeats, "
                             f"got {self.drafters!r}; e.g. drafters=('lookup', 'self')")
        for name in ("max_lookup_tokens", "max_self_draft"):
            check_number(getattr(self, name), f"DraftPolicyConfig.{name}", minimum=1, integer=True,
                         fix=f"{name}=4")
        check_type(self.bands, "DraftPolicyConfig.bands", PrecisionPolicyConfig,
                   "bands=PrecisionPolicyConfig(high=0.9, low=0.6)")


@dataclass(frozen=True)
class DraftChoice:
    """The drafter of the next round (``"lookup"``, ``"self"`` or ``"none"``) and its draft length."""

    drafter: str
    length: int


def choose_draft(score: float | None, lookup_tokens: int, config: DraftPolicyConfig) -> DraftChoice:
    """Drafter and draft length for the next round (see the module docstring for the rules).

    Args:
        score: the top tier's confidence in its last token, in [0, 1]; None before the first verify (treated as
            confident: the prefill's token is as good a start as any).
        lookup_tokens: tokens a prompt-lookup match offers (0: none).
        config: drafters, caps and confidence bands.
    Returns:
        ``DraftChoice``; its length is 0 exactly when its drafter is ``"none"``.
    """
    if lookup_tokens < 0:
        raise ValueError(f"choose_draft: lookup_tokens must be >= 0, got {lookup_tokens}")
    if "lookup" in config.drafters and lookup_tokens:
        return DraftChoice("lookup", min(lookup_tokens, config.max_lookup_tokens))
    if "self" in config.drafters:
        k = draft_length(1.0 if score is None else score, config.max_self_draft, config.bands)
        if k:
            return DraftChoice("self", k)
    return DraftChoice(NO_DRAFT, 0)
