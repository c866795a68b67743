"""Greedy tier-switching decode where each captured step also picks its token and its next tier.

Contract: ``FusedStepDecoder(engine, decision, capacity).generate(input_ids, DecodeOptions(...))`` returns
(B, max_new_tokens) greedy tokens. Each tier has ONE captured graph that runs the model forward at the
engine's static position, takes the argmax, writes it into the next step's input and into the output
buffer, advances the position, and (with a ``DeviceDecision``) computes the confidences, the batch score
and the next tier's ladder index into a (1 + B,) ``status`` tensor. The host per step only replays a
graph, queues one non-blocking copy of ``status`` into a pinned ring buffer and records an event.

Decision lag (``DecodeOptions.decision_lag``):
- 0: before step s the host waits on step s-1's event (one small sync per step, the
  default semantics: each decision applies to the very next forward); the GPU idles for that wake-up, the
  host's decision and the next launch;
- 1: before step s the host reads step s-2's status; the GPU is running step s-1 meanwhile, so it
  never idles (the decision applies one forward later).

Tiers come, in this order, from ``schedule`` (cyclic; statuses still computed and read: the real
controller cost on a replayed schedule), the ``controller``'s policy fed from the statuses, or ``tier``.
The controller's ``telemetry`` records one step per read, as ``PrecisionController`` does on the eager
path. Limits: greedy only (sampling and ``agreement_every``: use ``decode.decode``); the engine's limits.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from hf_adaptive.precision.capture import graph_capture
from hf_adaptive.precision.controller import PrecisionController
from hf_adaptive.precision.device_decision import DeviceDecision
from hf_adaptive.precision.graph_decode import GraphDecodeEngine
from hf_adaptive.precision.options import DecodeOptions
from hf_adaptive.precision.telemetry import read_with_wait

RING_SLOTS = 4  # pinned status slots; lag <= RING_SLOTS - 2 never overwrites an unread slot


def decision_for(controller: PrecisionController) -> DeviceDecision:
    """The device twin of ``controller``'s decision: its policy, its weights, its tier ladder."""
    return DeviceDecision(controller.policy.config, controller.tiers.ladder, controller.weights)


class FusedStepDecoder:
    """Per-tier captured steps with in-graph token pick and (optionally) in-graph tier decision.

    Args:
        engine: a ``GraphDecodeEngine`` (its static cache, position tensor and input buffer are shared).
        decision: ``DeviceDecision`` computed inside every step; None for a step without controller work.
        capacity: most tokens one ``generate`` may return (size of the on-device output buffer).
        compile_step: run the step through ``torch.compile`` (inductor, static shapes) before capturing
            it, so RMSNorm / RoPE / residual / confidence element-wise ops fuse into few kernels; each
            tier compiles once (dynamo guards on the tier). The caller owns compile settings (e.g.
            ``torch._dynamo.config.recompile_limit`` when many decoders / batch sizes share a process).
    """

    def __init__(self, engine: GraphDecodeEngine, decision: DeviceDecision | None = None,
                 capacity: int = 512, compile_step: bool = False) -> None:
        self.engine, self.decision = engine, decision
        self._step_fn = torch.compile(self._step, dynamic=False) if compile_step else self._step
        b, dev = engine.config.batch_size, engine.device
        self.capacity = capacity
        # (B, N + warm-up) output buffer: a capture's warm-up writes up to warmup_iters columns past the
        # step it precedes (scratch, overwritten later), also when it happens at the last step
        self.tokens = torch.zeros(b, capacity + engine.config.warmup_iters, dtype=torch.long, device=dev)
        self.step_index = torch.zeros(1, dtype=torch.long, device=dev)        # next output column
        self.status = torch.zeros(1 + b, dtype=torch.float32, device=dev)     # [tier index, scores]
        pin = dev.type == "cuda"
        self.host = torch.zeros(RING_SLOTS, 1 + b, dtype=torch.float32, pin_memory=pin)
        self.events = [torch.cuda.Event() for _ in range(RING_SLOTS)] if pin else None
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}

    def _step(self) -> None:
        """One decode step on static buffers; captured per tier (runs eagerly off CUDA graphs)."""
        e = self.engine
        logits = e.forward_static(e.ids[:, :1])[:, -1]  # (B, V)
        self._emit(logits)
        e.pos.add_(1)

    def _emit(self, logits: torch.Tensor) -> None:
        """Greedy token of (B, V) logits into the output and the next input; status if deciding."""
        tok = logits.argmax(-1)  # (B,)
        self.tokens.index_copy_(1, self.step_index, tok[:, None])
        self.engine.ids[:, :1].copy_(tok[:, None])
        self.step_index.add_(1)
        if self.decision is not None:
            self.status.copy_(self.decision(logits))

    def _warm_up(self) -> None:
        """Run the step ``warmup_iters`` times at scratch positions, then restore every static buffer."""
        e = self.engine
        saved = [t.clone() for t in (e.ids, e.pos, self.step_index, self.status)]
        cuda = e.device.type == "cuda"
        stream = torch.cuda.Stream() if cuda else None
        if cuda:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if cuda else nullcontext(), e.attention_backends():
            for _ in range(e.config.warmup_iters):
                self._step_fn()
        if cuda:
            torch.cuda.current_stream().wait_stream(stream)
        for t, s in zip((e.ids, e.pos, self.step_index, self.status), saved):
            t.copy_(s)

    def _capture(self, tier: str) -> None:
        """Capture ``tier``'s step on its first use (a tier never run costs no capture / compile).
        The warm-up restores every static buffer, so capturing mid-generation changes nothing."""
        with self.engine.tiers.use(tier):
            self._warm_up()
            graph = torch.cuda.CUDAGraph()
            with graph_capture(graph), self.engine.attention_backends():
                self._step_fn()
        self.graphs[tier] = graph

    def _run(self, tier: str) -> None:
        if self.engine.use_graphs:
            if tier not in self.graphs:
                self._capture(tier)
            self.graphs[tier].replay()
            return
        with self.engine.tiers.use(tier), self.engine.attention_backends():
            self._step_fn()

    def _publish(self, j: int) -> None:
        """Queue the copy of step j's status to pinned host slot j % RING_SLOTS (no wait)."""
        slot = j % RING_SLOTS
        self.host[slot].copy_(self.status, non_blocking=self.events is not None)
        if self.events is not None:
            self.events[slot].record()

    def _read(self, j: int) -> list[float]:
        slot = j % RING_SLOTS
        if self.events is not None:
            self.events[slot].synchronize()  # the one host wait of a step (lag 0); already done at lag 1
        return self.host[slot].tolist()

    def _start(self, prefill_logits: torch.Tensor) -> None:
        """Token 0 and status 0 from the prefill logits (eager, same math as the captured step)."""
        self.step_index.zero_()
        self.engine.pos.fill_(self.engine.position)
        self._emit(prefill_logits)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, opts: DecodeOptions) -> torch.Tensor:
        """Prefill (top tier, eager) then ``max_new_tokens - 1`` captured steps; returns (B, N) tokens."""
        opts.refuse("FusedStepDecoder.generate", ("do_sample", "agreement_every", "draft"),
                    "this loop is greedy; sampling and agreement checks run through decode.decode, drafts "
                    "through generate_verified")
        n = opts.max_new_tokens
        if not 1 <= n <= self.capacity:
            raise ValueError(f"FusedStepDecoder.generate: max_new_tokens must be in [1, {self.capacity}] "
                             f"(capacity), got {n}; build the decoder with a larger capacity")
        if opts.controller is not None and self.decision is None:
            raise ValueError("FusedStepDecoder.generate: a controller needs the decoder built with "
                             "decision=decision_for(controller)")
        if opts.controller is not None:
            opts.controller.reset()
        self.engine._check_room(0, input_ids.shape[1] + n + self.engine.config.warmup_iters)  # + warm-up slots
        self._start(self.engine.prefill(input_ids))
        _Loop(self, opts).run()
        self.engine.position += n - 1
        return self.tokens[:, :n].clone()


class _Loop:
    """The host side of one ``generate``: pick a tier, replay, publish; telemetry per status read."""

    def __init__(self, dec: FusedStepDecoder, opts: DecodeOptions) -> None:
        self.dec, self.opts, self.ctl = dec, opts, opts.controller
        self.ran = [dec.engine.tiers.top]  # tier that produced status j (0 = prefill)
        self.reads = dec.decision is not None and (self.ctl is not None)

    def run(self) -> None:
        if self.dec.decision is not None:
            self.dec._publish(0)
        for s in range(1, self.opts.max_new_tokens):
            tier = self._tier(s)
            self.dec._run(tier)
            self.ran.append(tier)
            if self.dec.decision is not None:
                self.dec._publish(s)
        if self.reads:
            self._observe(self.opts.max_new_tokens)  # the eager controller's final observe, for parity

    def _tier(self, s: int) -> str:
        decided = self._observe(s) if self.reads else None
        if self.opts.schedule:
            return self.opts.schedule[(s - 1) % len(self.opts.schedule)]
        if decided is not None:
            return decided
        return self.opts.tier or self.dec.engine.tiers.top

    def _observe(self, s: int) -> str:
        """Read status s-1-lag (if any), let the host policy apply its dwell, record telemetry."""
        start = time.perf_counter_ns()
        j = s - 1 - self.opts.decision_lag
        scores: list[float] = []
        wait = 0
        if j >= 0:
            status, wait = read_with_wait(lambda: self.dec._read(j))  # the wait is the device's time
            self.ctl.policy.apply(self.dec.decision.tier_name(status[0]))
            scores = status[1:]
        self.ctl.telemetry.record_step(self.ran[-1], scores, time.perf_counter_ns() - start - wait, wait)
        return self.ctl.policy.current
