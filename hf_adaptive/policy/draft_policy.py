"""Which drafter proposes the next tokens of a draft cascade, and how many: a pure decision (no torch).

Contract: ``choose_draft(score, lookup_tokens, config, history)`` takes the top tier's confidence in the token it
just emitted (a float in [0, 1], or None before the first verify), how many tokens a prompt-lookup match offers
(0: no match) and what each drafter has achieved so far (``DraftHistory``), and returns a ``DraftChoice``
(drafter name, draft length). It picks the option that emits the most tokens per unit of cost:

- a round's cost, in native forwards: the verify forward (1) plus ``k * cost`` of a k-token draft, where ``cost``
  is ``lookup_cost`` (about 0: an n-gram match runs no forward) or ``self_draft_cost`` (one forward of the int4
  tier, as a fraction of a native one);
- its tokens: the accepted prefix plus the verifier's own token, ``expected_tokens_per_round(k, a)`` with ``a``
  the drafter's per-token acceptance so far, shrunk toward a prior (``prior_weight`` pseudo-tokens): the score for
  the self-draft (the top tier's confidence predicts whether its int4 copy agrees; ``self_prior`` overrides it),
  ``prior_acceptance`` for lookup;
- the self-draft tries every length from 1 up to the confidence band's ``draft_length(score, max_self_draft)``; a
  lookup offers ``min(lookup_tokens, max_lookup_tokens)``; "none" (the verifier decodes alone) is worth 1.
- with ``self_stop`` set, the drafter ends a self-draft itself after its first doubtful token (int4's own p_max,
  which predicts int4's errors where the top tier's last score barely does), so the geometric model above, which
  assumes every drafted token is equally likely wrong, no longer prices its length. The self-draft is then asked
  for ``max_self_draft`` tokens whenever its first token pays for itself (a one-token round is worth more than 1)
  and valued as that one-token round against the other options.

So a drafter whose drafts keep being rejected stops running (lookup on free-form translation), and a self-draft that
costs too much of a native step is not run at all. ``carry_history`` keeps a share of each record for the next
generation of the same generator (``DraftPolicyConfig.carry``). A drafter missing from ``config.drafters`` is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from hf_adaptive.policy.precision_policy import PrecisionPolicyConfig, draft_length, expected_tokens_per_round
from hf_adaptive.validation import check_number, check_type

DRAFTERS = ("lookup", "self")
NO_DRAFT = "none"


@dataclass(frozen=True)
class DraftPolicyConfig:
    """Drafters enabled, their length caps and costs, the acceptance prior, and the self-draft's confidence bands.

    Attributes:
        drafters: which drafters may run, a subset of ``("lookup", "self")``.
        max_lookup_tokens: longest prompt-lookup draft.
        max_self_draft: longest self-draft (the confidence bands may shorten it).
        self_draft_cost: one int4 draft forward as a fraction of a native forward. The default is the int4 tier's
            step time over native on the Llama-3.1-8B shape (the precision area of eval/results/README.md);
            measure it for the model and card at hand.
        lookup_cost: one lookup draft token as a fraction of a native forward (0: no forward runs).
        prior_acceptance: the lookup's per-token acceptance before it has proposed anything.
        self_prior: the self-draft's per-token acceptance before evidence (e.g. measured for this model on similar
            text); None: the top tier's confidence in its last token.
        prior_weight: how many draft tokens of evidence the prior (and the score, for the self-draft) counts as.
        carry: the share of a drafter's evidence a generator keeps into its next generation (0: every generation
            starts from the priors; 1: all of it), so a drafter that failed on the last prompts starts out doubted.
        bands: the confidence bands that cap the self-draft's length (unused with ``self_stop``).
        self_stop: None, or a probability in (0, 1): the self-draft stops after the first token whose own p_max (the
            int4 tier's top softmax probability) is below it, so a draft runs on while int4 is sure of itself and
            ends where it is likely wrong. The policy then asks for ``max_self_draft`` tokens (see the module
            docstring).
        self_stop_sync: on CUDA, how many leading steps of a self-draft read their p_max at once: the host waits for
            each such step before queueing the next, so the device idles for one launch. Later steps are read one
            draft step late, after the next step is queued (no wait), so a draft stopped there carries one token
            more, which the verifier pays for and rejects. On CPU every p_max is read at once.
    """

    drafters: tuple[str, ...] = DRAFTERS
    max_lookup_tokens: int = 8
    max_self_draft: int = 4
    self_draft_cost: float = 0.65
    lookup_cost: float = 0.0
    prior_acceptance: float = 0.5
    self_prior: float | None = None
    prior_weight: float = 4.0
    carry: float = 0.5
    bands: PrecisionPolicyConfig = field(default_factory=PrecisionPolicyConfig)
    self_stop: float | None = None
    self_stop_sync: int = 0

    def __post_init__(self) -> None:
        bad = [d for d in self.drafters if d not in DRAFTERS]
        if not self.drafters or bad or len(set(self.drafters)) != len(self.drafters):
            raise ValueError(f"DraftPolicyConfig.drafters must be a non-empty subset of {DRAFTERS} without repeats, "
                             f"got {self.drafters!r}; e.g. drafters=('lookup', 'self')")
        for name in ("max_lookup_tokens", "max_self_draft"):
            check_number(getattr(self, name), f"DraftPolicyConfig.{name}", minimum=1, integer=True,
                         fix=f"{name}=4")
        for name, fix in (("self_draft_cost", "self_draft_cost=0.65"), ("lookup_cost", "lookup_cost=0.0"),
                          ("prior_weight", "prior_weight=4.0")):
            check_number(getattr(self, name), f"DraftPolicyConfig.{name}", minimum=0.0, fix=fix)
        for name, fix in (("prior_acceptance", "prior_acceptance=0.5"), ("carry", "carry=0.5")):
            check_number(getattr(self, name), f"DraftPolicyConfig.{name}", minimum=0.0, maximum=1.0, fix=fix)
        if self.self_prior is not None:
            check_number(self.self_prior, "DraftPolicyConfig.self_prior", minimum=0.0, maximum=1.0,
                         fix="self_prior=None (use the confidence) or a rate such as 0.8")
        if self.self_stop is not None:
            check_number(self.self_stop, "DraftPolicyConfig.self_stop", minimum=0.0, maximum=1.0, min_open=True,
                         max_open=True, fix="self_stop=None (lengths from the confidence bands) or a p_max such as 0.7")
        check_number(self.self_stop_sync, "DraftPolicyConfig.self_stop_sync", minimum=0, integer=True,
                     fix="self_stop_sync=0 (every p_max read one step late on CUDA) or e.g. 1")
        check_type(self.bands, "DraftPolicyConfig.bands", PrecisionPolicyConfig,
                   "bands=PrecisionPolicyConfig(high=0.9, low=0.6)")


@dataclass(frozen=True)
class DraftChoice:
    """The drafter of the next round (``"lookup"``, ``"self"`` or ``"none"``) and its draft length."""

    drafter: str
    length: int


@dataclass(frozen=True)
class DrafterRecord:
    """What one drafter achieved so far: draft tokens the verifier accepted, and rounds where it rejected one
    (weights, not counts, once evidence is carried across generations at a share: see :meth:`carried`)."""

    accepted: float = 0
    rejections: float = 0

    def after(self, proposed: int, accepted: int) -> DrafterRecord:
        """This record plus one round that proposed ``proposed`` tokens and kept the first ``accepted``."""
        if not 0 <= accepted <= proposed:
            raise ValueError(f"DrafterRecord.after: need 0 <= accepted <= proposed, got {accepted}, {proposed}")
        return DrafterRecord(self.accepted + accepted, self.rejections + int(accepted < proposed))

    def carried(self, share: float) -> DrafterRecord:
        """This evidence weighed by ``share``, as the next generation starts from it."""
        return DrafterRecord(self.accepted * share, self.rejections * share)

    def acceptance(self, prior: float, weight: float) -> float:
        """Per-token acceptance: accepted / (accepted + rejections), the maximum-likelihood rate of a geometric
        accepted prefix, shrunk toward ``prior`` by ``weight`` pseudo-tokens."""
        seen = self.accepted + self.rejections
        if seen + weight == 0:
            return prior
        return (self.accepted + weight * prior) / (seen + weight)


DraftHistory = Mapping[str, DrafterRecord]


def carry_history(history: DraftHistory, share: float) -> dict[str, DrafterRecord]:
    """Each drafter's record weighed by ``share`` (``DraftPolicyConfig.carry``) for the next generation."""
    return {name: record.carried(share) for name, record in history.items()} if share else {}


def round_value(length: int, acceptance: float, cost_per_token: float) -> float:
    """Expected tokens a round emits per native forward it costs (the verifier decoding alone is worth 1)."""
    return expected_tokens_per_round(length, acceptance) / (1.0 + length * cost_per_token)


def choose_draft(score: float | None, lookup_tokens: int, config: DraftPolicyConfig,
                 history: DraftHistory | None = None) -> DraftChoice:
    """Drafter and draft length for the next round (see the module docstring for the rule).

    Args:
        score: the top tier's confidence in its last token, in [0, 1]; None before the first verify (treated as
            confident: the prefill's token is as good a start as any).
        lookup_tokens: tokens a prompt-lookup match offers (0: none).
        config: drafters, caps, costs, prior and confidence bands.
        history: each drafter's record so far (this generation's rounds plus the share carried from earlier ones;
            missing: nothing recorded yet).
    Returns:
        ``DraftChoice``; its length is 0 exactly when its drafter is ``"none"``. Ties go to the cheaper option.
    """
    if lookup_tokens < 0:
        raise ValueError(f"choose_draft: lookup_tokens must be >= 0, got {lookup_tokens}")
    history = history or {}
    score = 1.0 if score is None else score
    best, best_value = DraftChoice(NO_DRAFT, 0), 1.0
    if "lookup" in config.drafters and lookup_tokens:
        k = min(lookup_tokens, config.max_lookup_tokens)
        a = history.get("lookup", DrafterRecord()).acceptance(config.prior_acceptance, config.prior_weight)
        value = round_value(k, a, config.lookup_cost)
        if value > best_value:
            best, best_value = DraftChoice("lookup", k), value
    if "self" in config.drafters:
        prior = score if config.self_prior is None else config.self_prior
        a = history.get("self", DrafterRecord()).acceptance(prior, config.prior_weight)
        if config.self_stop is None:
            cap = draft_length(score, config.max_self_draft, config.bands)
            options = [(k, round_value(k, a, config.self_draft_cost)) for k in range(1, cap + 1)]
        else:  # the drafter sets the length: drafting pays if its first token does
            options = [(config.max_self_draft, round_value(1, a, config.self_draft_cost))]
        for k, value in options:
            if value > best_value:
                best, best_value = DraftChoice("self", k), value
    return best
