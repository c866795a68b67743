"""``PrecisionController``: a ``LogitsProcessor`` that picks the next step's precision tier.

Usage::

    tiers = prepare_tiers(model, tiers=("int4", "native"))
    controller = PrecisionController(tiers)
    model.generate(**inputs, logits_processor=[controller])

Contract:
- It NEVER changes the scores: ``__call__`` returns the very tensor it was given.
- Confidence comes from the RAW logits. ``generate`` runs its own processors (repetition penalty,
  temperature, top-k...) BEFORE user ones, so the controller does not trust ``scores``: the tiered output
  projection (lm_head) computes the score in its own forward while a controller is open
  (``TierSelector.output_scores``; a value the compiled step guards on, so a step compiled before the controller
  existed is recompiled once with the score inside it); an untiered head gets a forward hook instead. Only where
  neither produced a score for these rows does it fall back to ``scores`` (then put it first / use it without
  other processors).
- ``close()`` (or leaving ``with PrecisionController(tiers) as ctl:``) removes its hooks and puts the model back
  on the top tier, so a later plain ``generate`` is not left on the lossy tier of the last step.
- It serves the model its tiers were prepared on, and refuses a call whose logits did not come from a forward
  of that model (another model's ``generate`` would otherwise be reported as int4 while running untouched).
- Each step's decision applies to the NEXT forward; a batch runs one tier per step (the policy's
  ``combine`` option says how per-sequence confidences merge).
- Prefill (a forward of more than one token) always runs in the top tier: int4 tinygemm has no gain
  at many rows, and the prompt's KV should be exact.
- One host read per step (the B confidences), and it adds no sync of its own: the confidence is computed in the
  output projection's forward (so under ``torch.compile`` it is part of the captured decode step), ``__call__``
  only queues its copy to pinned host memory, and the decision is taken before the NEXT forward, when ``generate``
  prepares its inputs (outside the compiled forward, so that forward has no graph break; the model's forward
  pre-hook settles for callers that skip that step). By then ``generate`` has made its own per-step read
  (the stopping check), so the copy is complete and the read does not wait; the decision still applies to the
  very next forward, as if it were taken in ``__call__``. The step pending at the end of a call is settled when
  ``telemetry`` is read, or by ``reset`` / ``close``.
- Where ``generate`` reads its stop flag one step late (``hf_adaptive.overlap``, e.g. with
  ``AdaptiveStaticKVCache`` on CUDA), the last step's copy is not complete when the next forward is prepared, so the
  decision comes from the step before it (``decision_lag``): still no wait. A call that stops on EOS there runs one
  extra forward, which generate undoes; the telemetry records it as a step.

This eager path is what ``generate`` uses. On the CUDA-graph path, ``fused_decode.FusedStepDecoder``
takes a controller and computes the same confidence, band and next-tier index INSIDE each captured
step (``device_decision.DeviceDecision``, built by ``fused_decode.decision_for(controller)``); only
the dwell rule (``PrecisionPolicy.apply``) and the telemetry stay on the host.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from hf_adaptive.overlap import forget_stop_check, stop_check_deferred
from hf_adaptive.policy.precision_policy import PrecisionPolicy, PrecisionPolicyConfig
from hf_adaptive.precision.confidence import ConfidenceWeights, confidence_score
from hf_adaptive.precision.host_copies import HostCopies
from hf_adaptive.precision.telemetry import PrecisionTelemetry, read_with_wait
from hf_adaptive.precision.tiers import PrecisionTiers
from hf_adaptive.validation import check_type

logger = logging.getLogger(__name__)


@dataclass
class _QueuedStep:
    """One step's scores on their way to the host, not yet decided on."""

    tier: str  # the tier whose forward produced the scores
    host: torch.Tensor  # (B,) scores: a pinned host copy on CUDA (complete once ``event`` fired), else the tensor
    event: torch.cuda.Event | None
    queue_ns: int  # host time ``__call__`` spent on the step


class _SettleBeforeInputs:
    """Settles the queued step when ``generate`` prepares the next forward's inputs: after its per-step stopping read
    (the scores' copy is complete, nothing waits) and outside the compiled forward. The forward pre-hook then finds
    nothing queued, so the compiled step has no graph break; the pre-hook stays the fallback for callers that do not
    prepare inputs this way. Removed like a hook handle (``remove``), restoring the model's own method.

    Not a pre-hook excluded from compilation as a whole (as the KV caches' step hooks are): engines that compile a
    function calling the model would then break their graph at every call (the fused-step test counts 3 such
    breaks)."""

    def __init__(self, model, settle) -> None:
        self.model = model
        self.had_own = "prepare_inputs_for_generation" in vars(model)
        self.original = model.prepare_inputs_for_generation

        def prepare_inputs_for_generation(*args, **kwargs):
            settle()
            return self.original(*args, **kwargs)

        self.wrapper = prepare_inputs_for_generation
        model.prepare_inputs_for_generation = prepare_inputs_for_generation

    def remove(self) -> None:
        if vars(self.model).get("prepare_inputs_for_generation") is not self.wrapper:
            return  # another wrapper sits on top: leave the chain (settling a closed controller does nothing)
        if self.had_own:
            self.model.prepare_inputs_for_generation = self.original
        else:
            del self.model.prepare_inputs_for_generation


class _ScoresOff:
    """Turns the tiered output projection's scores off again for their owner, like removing a hook handle."""

    def __init__(self, sink, owner) -> None:
        self.sink, self.owner = sink, owner

    def remove(self) -> None:
        self.sink.disable(self.owner)


def default_policy_config(tiers: PrecisionTiers, **overrides) -> PrecisionPolicyConfig:
    """The confidence bands on a prepared ladder: a step scoring above ``high`` (0.9) runs the cheapest tier,
    one between ``low`` (0.6) and ``high`` runs native (or the top tier when native is not prepared), one below
    ``low`` runs the top tier. ``overrides`` replace any ``PrecisionPolicyConfig`` field."""
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
        decision_lag: how many steps back the decision for the next forward looks in ``generate``: 0 decides from
            the step just run, 1 from the one before it. None (default) takes 1 exactly where the ``generate`` call
            reads its stop flag one step late (``hf_adaptive.overlap``: there, reading the step just run would wait
            for the device and undo the overlap), else 0.
    """

    def __init__(self, tiers: PrecisionTiers, policy: PrecisionPolicyConfig | None = None,
                 weights: ConfidenceWeights | None = None, telemetry: PrecisionTelemetry | None = None,
                 read_raw_logits: bool = True, decision_lag: int | None = None) -> None:
        if not isinstance(tiers, PrecisionTiers):
            raise TypeError(f"PrecisionController: tiers must be the handle prepare_tiers returns; got "
                            f"{type(tiers).__name__}. Fix: PrecisionController(prepare_tiers(model))")
        _check_installed(tiers)
        self.tiers = tiers
        config = policy or default_policy_config(tiers)
        if not isinstance(config, PrecisionPolicyConfig):
            raise TypeError(f"PrecisionController: policy must be a PrecisionPolicyConfig or None; got "
                            f"{type(config).__name__}. Fix: policy=default_policy_config(tiers, high=0.9)")
        wanted = config.tiers + ((config.initial_tier,) if config.initial_tier else ())
        missing = [t for t in wanted if t not in tiers.ladder]
        if missing:
            raise ValueError(f"PrecisionController: policy tiers {missing} are not prepared; prepared "
                             f"tiers are {tiers.ladder}. Pass them to prepare_tiers(tiers=...) or fix policy")
        self.policy = PrecisionPolicy(config)
        self.weights = check_type(weights or ConfidenceWeights(), "PrecisionController: weights", ConfidenceWeights,
                                  "weights=ConfidenceWeights() or None")
        self._telemetry = check_type(telemetry if telemetry is not None else PrecisionTelemetry(),
                                     "PrecisionController: telemetry", PrecisionTelemetry, "telemetry=None")
        if decision_lag is not None and (isinstance(decision_lag, bool) or decision_lag not in (0, 1)):
            raise ValueError(f"PrecisionController: decision_lag must be None, 0 or 1; got {decision_lag!r}. Fix: "
                             "None (follow generate), 0 (decide from the step just run) or 1 (from the one before)")
        self.decision_lag = decision_lag
        self._score: torch.Tensor | None = None  # (B,) confidence of the last forward, from the head's hook
        self._queued: deque[_QueuedStep] = deque()  # __call__'s steps, oldest first, decided on before a forward
        self._host = HostCopies()
        self._settle_due = False  # == (len(self._queued) > lag), as a bool torch.compile can specialise on
        self._settle_eagerly = torch.compiler.disable(self._settle)
        self._pending = None  # observe_lagged: (host scores, copy-done event) of the previous step
        self._forwarded = False  # a forward of tiers.model ran since the last __call__
        self._hooks = []
        self._install_hooks(read_raw_logits)

    def _install_hooks(self, read_raw_logits: bool) -> None:
        model = self.tiers.model
        self._hooks.append(model.register_forward_pre_hook(self._on_forward))
        self._hooks.append(model.get_input_embeddings().register_forward_pre_hook(self._on_embed))
        head = model.get_output_embeddings()
        if read_raw_logits and getattr(head, "is_output", False) and head.selector is self.tiers.selector:
            # the tiered output projection computes the score in its own forward (compiled steps included)
            self.tiers.selector.output_scores.enable(self.weights, self)
            self._hooks.append(_ScoresOff(self.tiers.selector.output_scores, self))
        elif read_raw_logits:  # an untiered head: a hook (a step compiled before it was added does not run it)
            self._hooks.append(head.register_forward_hook(self._on_logits))
        if callable(getattr(model, "prepare_inputs_for_generation", None)):
            self._hooks.append(_SettleBeforeInputs(model, self._settle))

    @property
    def telemetry(self) -> PrecisionTelemetry:
        """What the controller did, every step of the last call included (reading it settles the pending steps)."""
        self._settle(flush=True)
        return self._telemetry

    def _on_forward(self, module, args) -> None:
        # a plain bool, so torch.compile specialises on it: where a step is queued (generate's decode) the settle
        # runs eagerly (it reads the host copy and switches the tier, which the compiled forward then guards on:
        # one graph per tier); where none is (engines that capture their own step) nothing breaks the graph
        if self._settle_due:
            self._settle_eagerly()
        self._forwarded = True

    def _on_embed(self, module, args) -> None:
        ids = args[0] if args else None
        if ids is not None and ids.dim() == 2 and ids.shape[1] > 1:  # prefill / multi-token forward
            self.policy.reset()
            self.tiers.set(self.tiers.top)
            forget_stop_check()  # generate decides after the prefill; a mode that never asks reads every step

    def _on_logits(self, module, args, output) -> None:
        # device work only (no host read): inside generate's compiled forward it is part of the captured step
        self._score = confidence_score(output[:, -1, :], self.weights)

    def _take_score(self) -> torch.Tensor | None:
        """The last forward's (B,) score, from the tiered output projection or the hook (None: neither ran)."""
        score, self._score = self._score, None
        tiered = self.tiers.selector.output_scores.take(self)
        return tiered if score is None else score

    def close(self) -> None:
        """Remove the hooks this controller installed and put the model back on the top tier (idempotent)."""
        self._settle(flush=True)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._score = self._pending = None
        self.tiers.set(self.tiers.top)

    def __enter__(self) -> PrecisionController:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def reset(self) -> None:
        """Start a new generation: initial tier active, telemetry kept (call ``telemetry.reset()``)."""
        self._settle(flush=True)
        self.policy.reset()
        self._pending = None
        self.tiers.set(self.policy.current)

    def observe(self, logits: torch.Tensor) -> str:
        """Record one step from its (B, V) raw logits, switch the tier for the next forward, return it."""
        self._settle(flush=True)
        self._take_score()  # this forward's own score: the caller hands its logits instead
        start = time.perf_counter_ns()
        ran = self.tiers.active
        score = confidence_score(logits, self.weights)
        # the one host read of the step: B floats, needed to choose a kernel on the host; on CUDA it waits for the
        # step's forward, which is the device's time, not the controller's
        scores, wait = read_with_wait(score.tolist)
        decision = self.policy.decide(scores)
        self.tiers.set(decision)
        self._telemetry.record_step(ran, scores, time.perf_counter_ns() - start - wait, wait)
        return decision

    def observe_lagged(self, logits: torch.Tensor) -> str:
        """Like ``observe``, but decides from the PREVIOUS step's scores, so the host never waits.

        This step's (B,) scores are copied to pinned host memory asynchronously; the decision uses the
        last step's copy, long finished, so the GPU keeps running ahead (the decision then applies one
        forward later than with ``observe``). For the graph engine, where one sync per step is visible.
        """
        self._settle(flush=True)
        self._take_score()  # this forward's own score: the caller hands its logits instead
        start = time.perf_counter_ns()
        ran = self.tiers.active
        pending, self._pending = self._pending, self._host.start(confidence_score(logits, self.weights))
        scores: list[float] = []
        wait = 0
        if pending is not None:
            host, event = pending
            if event is not None:  # recorded a step ago: already complete, returns at once
                _, wait = read_with_wait(event.synchronize)
            scores = host.tolist()
            self.tiers.set(self.policy.decide(scores))
        self._telemetry.record_step(ran, scores, time.perf_counter_ns() - start - wait, wait)
        return self.tiers.active

    def _lag(self) -> int:
        return self.decision_lag if self.decision_lag is not None else int(stop_check_deferred())

    def _settle(self, flush: bool = False) -> None:
        """Decide on the queued steps but the ``decision_lag`` newest (all of them with ``flush``): read each one's
        scores (on CUDA its copy is complete once generate read its stopping flag for that step, so this does not
        wait), pick the next forward's tier, record the step."""
        keep = 0 if flush else self._lag()
        while len(self._queued) > keep:
            queued = self._queued.popleft()
            start = time.perf_counter_ns()
            wait = 0
            if queued.event is not None:
                _, wait = read_with_wait(queued.event.synchronize)
            scores = queued.host.tolist()
            self.tiers.set(self.policy.decide(scores))
            self._telemetry.record_step(queued.tier, scores, queued.queue_ns + time.perf_counter_ns() - start - wait,
                                        wait, queue_ns=queued.queue_ns)
        self._settle_due = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self._hooks:
            raise ValueError("PrecisionController was called after close(). Fix: create a new controller per "
                             "generate, or use `with PrecisionController(tiers) as ctl:` around the generate call.")
        if not self._forwarded:
            raise ValueError(f"PrecisionController: these scores come from a forward that did not run the model its "
                             f"tiers were prepared on ({type(self.tiers.model).__name__} at "
                             f"{id(self.tiers.model):#x}); its tiers would switch a model that is not generating. "
                             "Fix: generate with tiers.model, or prepare_tiers(this_model) and a new controller.")
        self._forwarded = False
        start = time.perf_counter_ns()
        self._settle()  # generate's input preparation (or the forward's pre-hook) settled it already
        score = self._take_score()
        if score is None or score.shape[0] != scores.shape[0]:  # no output-projection score for these rows
            score = confidence_score(scores, self.weights)
            self._telemetry.eager_score_steps += 1
        host, event = self._host.start(score)
        self._queued.append(_QueuedStep(self.tiers.active, host, event, time.perf_counter_ns() - start))
        self._settle_due = len(self._queued) > self._lag()
        return scores


def _check_installed(tiers: PrecisionTiers) -> None:
    """The handle's tiered linears must still sit in its model: otherwise ``set`` switches layers nothing runs."""
    tiered = {id(m) for m in tiers.modules}
    if tiered and not any(id(m) in tiered for m in tiers.model.modules()):
        raise ValueError("PrecisionController: the model of these tiers no longer holds their tiered linears (was it "
                         "reloaded, copied or prepared again?). Fix: prepare_tiers(model) again and build the "
                         "controller from that handle.")
