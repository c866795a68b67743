"""``PrecisionController``: a ``LogitsProcessor`` that picks the next step's precision tier.

Usage::

    tiers = prepare_tiers(model, tiers=("int4", "native"))
    controller = PrecisionController(tiers)
    model.generate(**inputs, logits_processor=[controller])

Contract:
- It NEVER changes the scores: ``__call__`` returns the very tensor it was given.
- Confidence comes from the RAW logits. ``generate`` runs its own processors (repetition penalty,
  temperature, top-k...) BEFORE user ones, so the controller does not trust ``scores``: it keeps a
  forward hook on the model's output embedding (lm_head) that holds a reference to the last
  position's raw logits, and falls back to ``scores`` only where no hook output is present (then
  put it first / use it without other processors). Call ``close()`` to remove its hooks.
- Each step's decision applies to the NEXT forward; a batch runs one tier per step (the policy's
  ``combine`` option says how per-sequence confidences merge).
- Prefill (a forward of more than one token) always runs in the top tier: int4 tinygemm has no gain
  at many rows, and the prompt's KV should be exact.
- One host read per step (the B confidences): needed because the tier is a host-side dispatch.

This eager path is what ``generate`` uses. On the CUDA-graph path, ``fused_decode.FusedStepDecoder``
takes a controller and computes the same confidence, band and next-tier index INSIDE each captured
step (``device_decision.DeviceDecision``, built by ``fused_decode.decision_for(controller)``); only
the dwell rule (``PrecisionPolicy.apply``) and the telemetry stay on the host.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import LogitsProcessor

from hf_adaptive.policy.precision_policy import PrecisionPolicy, PrecisionPolicyConfig
from hf_adaptive.precision.confidence import ConfidenceWeights, confidence_score
from hf_adaptive.precision.telemetry import PrecisionTelemetry
from hf_adaptive.precision.tiers import PrecisionTiers

logger = logging.getLogger(__name__)


def default_policy_config(tiers: PrecisionTiers, **overrides) -> PrecisionPolicyConfig:
    """Confidence bands mapped onto a prepared ladder: fast = cheapest, mid = native (or top), top = top."""
    mid = "native" if "native" in tiers.ladder else tiers.top
    base = dict(fast_tier=tiers.fast, mid_tier=mid, top_tier=tiers.top)
    base.update(overrides)
    return PrecisionPolicyConfig(**base)


class PrecisionController(LogitsProcessor):
    """Chooses the tier of the next forward from this step's confidence; returns scores unchanged.

    Args:
        tiers: handle from ``prepare_tiers``.
        policy: thresholds / tier names / combine mode; default ``default_policy_config(tiers)``.
        weights: confidence score weights.
        telemetry: where steps are recorded (a fresh ``PrecisionTelemetry`` by default).
        read_raw_logits: hook lm_head for raw logits (default True); False trusts ``scores``.
    """

    def __init__(self, tiers: PrecisionTiers, policy: PrecisionPolicyConfig | None = None,
                 weights: ConfidenceWeights | None = None, telemetry: PrecisionTelemetry | None = None,
                 read_raw_logits: bool = True) -> None:
        self.tiers = tiers
        config = policy or default_policy_config(tiers)
        missing = [t for t in config.tiers if t not in tiers.ladder]
        if missing:
            raise ValueError(f"PrecisionController: policy tiers {missing} are not prepared; prepared "
                             f"tiers are {tiers.ladder}. Pass them to prepare_tiers(tiers=...) or fix policy")
        self.policy = PrecisionPolicy(config)
        self.weights = weights or ConfidenceWeights()
        self.telemetry = telemetry if telemetry is not None else PrecisionTelemetry()
        self._raw: torch.Tensor | None = None
        self._pending = None  # observe_lagged: (host scores, copy-done event) of the previous step
        self._hooks = []
        self._install_hooks(read_raw_logits)

    def _install_hooks(self, read_raw_logits: bool) -> None:
        model = self.tiers.model
        self._hooks.append(model.get_input_embeddings().register_forward_pre_hook(self._on_embed))
        if read_raw_logits:
            self._hooks.append(model.get_output_embeddings().register_forward_hook(self._on_logits))

    def _on_embed(self, module, args) -> None:
        ids = args[0] if args else None
        if ids is not None and ids.dim() == 2 and ids.shape[1] > 1:  # prefill / multi-token forward
            self.policy.reset()
            self.tiers.set(self.tiers.top)

    def _on_logits(self, module, args, output) -> None:
        self._raw = output[:, -1, :]  # a reference, no copy and no sync

    def close(self) -> None:
        """Remove the hooks this controller installed."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def reset(self) -> None:
        """Start a new generation: initial tier active, telemetry kept (call ``telemetry.reset()``)."""
        self.policy.reset()
        self._pending = None
        self.tiers.set(self.policy.current)

    def observe(self, logits: torch.Tensor) -> str:
        """Record one step from its (B, V) raw logits, switch the tier for the next forward, return it."""
        start = time.perf_counter_ns()
        ran = self.tiers.active
        # the one host read of the step: B floats, needed to choose a kernel on the host
        scores = confidence_score(logits, self.weights).tolist()
        decision = self.policy.decide(scores)
        self.tiers.set(decision)
        self.telemetry.record_step(ran, scores, time.perf_counter_ns() - start)
        return decision

    def observe_lagged(self, logits: torch.Tensor) -> str:
        """Like ``observe``, but decides from the PREVIOUS step's scores, so the host never waits.

        This step's (B,) scores are copied to pinned host memory asynchronously; the decision uses the
        last step's copy, long finished, so the GPU keeps running ahead (the decision then applies one
        forward later than with ``observe``). For the graph engine, where one sync per step is visible.
        """
        start = time.perf_counter_ns()
        ran = self.tiers.active
        pending, self._pending = self._pending, self._queue_scores(confidence_score(logits, self.weights))
        scores: list[float] = []
        if pending is not None:
            host, event = pending
            if event is not None:
                event.synchronize()  # recorded a step ago: already complete, returns at once
            scores = host.tolist()
            self.tiers.set(self.policy.decide(scores))
        self.telemetry.record_step(ran, scores, time.perf_counter_ns() - start)
        return self.tiers.active

    @staticmethod
    def _queue_scores(scores: torch.Tensor):
        if not scores.is_cuda:
            return scores, None
        host = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
        host.copy_(scores, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        raw, self._raw = self._raw, None
        use_raw = raw is not None and raw.shape[0] == scores.shape[0]
        self.observe(raw if use_raw else scores)
        return scores
