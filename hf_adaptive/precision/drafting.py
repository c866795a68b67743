"""The drafters of the lossless cascade, behind transformers' ``CandidateGenerator`` interface.

Contract: ``CascadeCandidateGenerator(tiers, DraftPolicyConfig(...))`` proposes draft tokens for a verifier that
runs the model at its top tier. Per round, ``get_candidates(input_ids)`` returns ``(input_ids + drafts, None)``
(batch 1) from one of two drafters, chosen by the pure ``choose_draft`` policy from the last confidence and what
each drafter achieved so far (expected tokens per unit of cost; a share carries over between generations):

- ``"lookup"``: transformers' own ``PromptLookupCandidateGenerator`` (n-gram match over the prompt and the output
  so far); no forward, so the drafts are free;
- ``"self"``: the same model with its decoder linears switched to the cheapest tier of ``prepare_tiers`` (int4),
  decoding greedily from the generation's own cache; the draft forwards' KV entries are cropped from that cache
  before returning, and the tier switched back, so the verifier writes its own KV at those positions. With
  ``DraftPolicyConfig.self_stop`` a self-draft ends after its first token whose own int4 p_max is below it (on CUDA
  read one draft step late through pinned copies, so the step waits for no host read, except the first
  ``self_stop_sync`` steps, which are read at once).

``update_candidate_strategy`` hears how many drafts the verifier kept and its confidence in the next token, and
records the round in ``history`` (what the policy reads) and ``telemetry``. The decoding loop that calls both is
``cascade.cascade_decoding``.
Knows nothing about acceptance or logits processors: the verifier decides.
"""

from __future__ import annotations

import time

import torch
from transformers.generation.candidate_generator import CandidateGenerator, PromptLookupCandidateGenerator

from hf_adaptive.compat import crop_cache, forward_cache_kwargs
from hf_adaptive.policy.draft_policy import (NO_DRAFT, DraftChoice, DrafterRecord, DraftPolicyConfig, carry_history,
                                             choose_draft)
from hf_adaptive.precision.capture import begin_graph_step
from hf_adaptive.precision.confidence import ConfidenceWeights, confidence_score
from hf_adaptive.precision.draft_telemetry import DraftTelemetry, RoundRecord
from hf_adaptive.precision.host_copies import HostCopies, settled
from hf_adaptive.precision.step_graphs import CapturedSteps
from hf_adaptive.precision.tiers import PrecisionTiers
from hf_adaptive.validation import check_number, check_type


class CascadeCandidateGenerator(CandidateGenerator):
    """Prompt-lookup and int4 self-drafts for one model, the drafter and length picked per round by confidence.

    Args:
        tiers: the handle ``prepare_tiers(model, tiers=(...))`` returned; its cheapest tier drafts, its top tier is
            what the verifier must run (the cascade restores it after every self-draft).
        config: drafters, caps and confidence bands (``DraftPolicyConfig``).
        max_matching_ngram_size: longest n-gram the lookup matches (it tries shorter ones down to 1).
        weights: the confidence score's weights (``ConfidenceWeights``).
        step_graphs: where the cascade runs compiled on a ``StaticCache``, capture each forward (verify widths, the
            int4 draft step) as a CUDA graph of its own and replay it (``step_graphs.CapturedSteps``: a few launches
            of host time), instead of ``generate``'s compiled call (dynamo's guard checks on every forward). On by
            default: replaying recorded translation rounds on the Llama-3.1-8B shape (H100) it took the cascade from
            8.27 to 6.41 ms per token, token-identical (``precision_cascade_replay_selfstop_h100``). Other caches
            keep ``generate``'s compiled call either way.
    """

    def __init__(self, tiers: PrecisionTiers, config: DraftPolicyConfig | None = None, *,
                 max_matching_ngram_size: int = 3, weights: ConfidenceWeights | None = None,
                 step_graphs: bool = True) -> None:
        check_type(tiers, "CascadeCandidateGenerator: tiers", PrecisionTiers,
                   "tiers = prepare_tiers(model, tiers=('int4', 'fp32'))")
        check_number(max_matching_ngram_size, "CascadeCandidateGenerator: max_matching_ngram_size", minimum=1,
                     integer=True, fix="max_matching_ngram_size=3")
        self.tiers = tiers
        self.config = config or DraftPolicyConfig()
        check_type(self.config, "CascadeCandidateGenerator: config", DraftPolicyConfig, "config=DraftPolicyConfig()")
        if "self" in self.config.drafters and len(tiers.ladder) < 2:
            raise ValueError(f"CascadeCandidateGenerator: the self-draft needs a cheaper tier than the top one; "
                             f"tiers has only {tiers.ladder}. Fix: prepare_tiers(model, tiers=('int4', "
                             "'fp32')) (or 'native' for a 16-bit model), or DraftPolicyConfig(drafters=('lookup',))")
        self.max_matching_ngram_size = max_matching_ngram_size
        check_type(step_graphs, "CascadeCandidateGenerator: step_graphs", bool, "step_graphs=True")
        self.step_graphs = step_graphs
        self._captured: tuple[str, CapturedSteps] | None = None  # (compile backend, the graphs), across generations
        self.weights = weights or ConfidenceWeights()
        self.telemetry = DraftTelemetry()
        self.cache = None
        self.forward = None  # what the self-draft's one-token forwards call (bind sets it)
        self.score: float | None = None
        self.choice = DraftChoice(NO_DRAFT, 0)
        self.history: dict[str, DrafterRecord] = {}
        self.draft_ns = 0
        self._host = HostCopies()  # the self-draft's p_max, copied to the host without waiting (self_stop)
        self._lookup: PromptLookupCandidateGenerator | None = None

    def bind(self, cache, eos_token_id: torch.Tensor | None, max_length: int, forward=None) -> None:
        """Start a generation: the cache the verifier fills, the stop tokens and the length limit of ``generate``;
        the drafters' records so far are kept at the share ``config.carry``. ``forward`` runs the self-draft's
        one-token steps: ``generate``'s compiled step where the cascade runs compiled (each tier's step then is a
        captured graph), else the model itself (None)."""
        self.cache, self.score = cache, None
        self.forward = forward if forward is not None else self.tiers.model
        self.history = carry_history(self.history, self.config.carry)
        self._lookup = PromptLookupCandidateGenerator(
            eos_token_id=eos_token_id, num_output_tokens=self.config.max_lookup_tokens,
            max_matching_ngram_size=self.max_matching_ngram_size, max_length=max_length)

    def captured_steps(self, compile_config=None) -> CapturedSteps:
        """This generator's ``CapturedSteps`` for its model (kept across generations, so graphs captured on a cache
        that is reset and passed again are replayed, not captured again), compiled with ``compile_config``'s
        backend (``generate``'s ``CompileConfig``; None: inductor)."""
        backend = getattr(compile_config, "backend", None) or "inductor"
        if self._captured is None or self._captured[0] != backend:
            self._captured = (backend, CapturedSteps(self.tiers.model, self.tiers, backend))
        return self._captured[1]

    @property
    def num_drafting_tokens(self) -> int:
        """The longest draft a round can propose (transformers sizes cache rollback buffers by it)."""
        return max(self.config.max_lookup_tokens, self.config.max_self_draft)

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, None]:
        """``input_ids`` (1, L) -> (1, L + k) with k drafted tokens (k may be 0), and no draft logits.

        The cache must hold the KV of ``input_ids[:, :-1]`` (the verifier feeds the last token with the drafts).
        """
        if self._lookup is None:
            raise RuntimeError("CascadeCandidateGenerator.get_candidates: call bind(cache, eos, max_length) first; "
                               "cascade_decoding does it at the start of every generation")
        begin = time.perf_counter_ns()
        room = self._lookup.max_length - input_ids.shape[1] - 1  # the verifier adds one token of its own
        drafts = self._lookup_drafts(input_ids) if "lookup" in self.config.drafters else input_ids[:, :0]
        self.choice = choose_draft(self.score, drafts.shape[1], self.config, self.history)
        k = max(0, min(self.choice.length, room))
        if self.choice.drafter == "self" and k:
            drafts = self._self_drafts(input_ids, k)
        elif self.choice.drafter == "lookup":
            drafts = drafts[:, :k]
        else:
            drafts = input_ids[:, :0]
        self.draft_ns = time.perf_counter_ns() - begin
        return torch.cat([input_ids, drafts], dim=1), None

    def _lookup_drafts(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """(1, n) tokens that followed the first earlier occurrence of the sequence's trailing n-gram; n may be 0."""
        candidates, _ = self._lookup.get_candidates(input_ids)
        return candidates[:, input_ids.shape[1]:]

    @torch.no_grad()
    def _self_drafts(self, input_ids: torch.LongTensor, k: int) -> torch.LongTensor:
        """Up to k greedy tokens of the cheapest tier, decoded from the shared cache, whose entries are then cropped.

        With ``config.self_stop`` the draft ends after its first token whose own p_max is below it: read at once on
        CPU and in CUDA's first ``config.self_stop_sync`` steps; later CUDA steps are read one step late, after the
        next step is queued, so the device does not wait on the host (the step already queued is kept as one more
        draft token).
        """
        model, start = self.tiers.model, input_ids.shape[1] - 1  # the cache holds input_ids[:, :-1]: no host read
        stop = self.config.self_stop
        # one buffer: [last token, drafts]; every step feeds a (1, 1) view of it, so a compiled step sees the same
        # strides at every step (as generate's own input slices) and is not compiled twice
        tokens = input_ids.new_empty(1, k + 1)
        tokens[:, :1] = input_ids[:, -1:]
        ran, pending = k, None  # pending: (host p_max, copy event) of the last step, maybe not read yet
        with self.tiers.use(self.tiers.fast):
            for i in range(k):
                pos = torch.arange(start + i, start + i + 1, device=input_ids.device)[None]  # (1, 1)
                begin_graph_step(self.forward, model)
                logits = self.forward(input_ids=tokens[:, i:i + 1], position_ids=pos, use_cache=True,
                                      logits_to_keep=1, **forward_cache_kwargs(model, self.cache)).logits[:, -1]
                tokens[:, i + 1] = logits.argmax(-1)  # (1,) from (1, V)
                if stop is None or i == k - 1:
                    continue
                copy = self._host.start(torch.softmax(logits.float(), dim=-1).amax(-1))
                # CPU, and CUDA's first self_stop_sync steps: this step (a wait on CUDA); later CUDA steps: the one
                # before, which ran before the step just queued, so the wait ends while the device keeps working
                now = copy[1] is None or i < self.config.self_stop_sync
                judged, pending = (copy if now else pending), copy
                if judged is not None and float(settled(judged)[0]) < stop:
                    ran = i + 1
                    break
        crop_cache(self.cache, ran)  # the draft's int4 KV must not reach the verifier
        return tokens[:, 1:ran + 1]

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int,
                                  confidence: float | None = None, verify_ns: int = 0) -> None:
        """Record the round and keep the confidence that picks the next drafter.

        Args:
            input_ids: the sequence after the round (unused; part of transformers' interface).
            scores: the verifier's raw logits (1, k + 1, V) of the round.
            num_matches: drafts the verifier accepted.
            confidence: the verifier's confidence in the token it emitted (row ``num_matches`` of ``scores``);
                computed here (one host read) when the caller has not read it already.
            verify_ns: host time of the verify forward.
        """
        if confidence is None:
            confidence = float(confidence_score(scores[:, num_matches], self.weights)[0])
        proposed = scores.shape[1] - 1
        if proposed:
            drafter = self.choice.drafter
            self.history[drafter] = self.history.get(drafter, DrafterRecord()).after(proposed, int(num_matches))
        self.telemetry.record_round(
            RoundRecord(self.choice.drafter if proposed else NO_DRAFT, proposed, int(num_matches),
                        int(num_matches) + 1, self.score), self.draft_ns, verify_ns)
        self.score = confidence
