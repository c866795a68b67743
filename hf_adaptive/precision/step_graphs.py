"""Decode forwards replayed from CUDA graphs captured once per (tier, width), over one static KV cache.

Why: through ``generate``'s compiled call (cudagraph trees) every forward of the Llama-3.1-8B shape costs about 3 ms
of host time (dynamo's guard checks, the trees' bookkeeping, the model's Python; `precision_generate_h100`), as much
as an int4 step's device time, so a loop of back-to-back forwards such as the cascade's self-draft runs at the host's
pace. A graph captured once replays for a few launches of host time, so the device's time sets the step's cost.

Contract: ``CapturedSteps(model, tiers)`` is called like the model's forward:

    out = steps(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=keep, cache=static_cache)

for ids (B, q) fed where the cache's device length stands (``position_ids`` are those positions) and returns the
model's output; its ``logits`` are graph-owned, so a caller copies what it keeps before the next call with the same
(tier, q, keep). The first call of a (tier, q, keep) compiles the forward (``torch.compile``, static shapes, no
cudagraphs of its own), runs it twice on a side stream and takes back what those runs wrote (their KV lies past the
cache's length, which is rewound), then captures it; every later call copies ids and positions into the graph's
buffers and replays it. The cache must keep its length on the device and advance it inside the forward
(transformers' ``StaticCache``: ``supports(cache)``); a cache with host-side decisions per step
(``AdaptiveStaticKVCache``) would have them frozen into the graph and is refused. A call with another cache object drops the graphs (capture again).
Off CUDA, or with ``use_graphs=False``, the same happens short of the capture: the warm-up runs are taken back and the
compiled forward runs on the static buffers, un-captured.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from hf_adaptive.compat import crop_cache
from hf_adaptive.precision.capture import graph_capture
from hf_adaptive.precision.tiers import PrecisionTiers

WARMUP_RUNS = 2  # the first compiles; the second runs what the capture will record


def supports(cache) -> bool:
    """Whether ``cache`` can be driven by captured steps: every layer a full-attention static layer whose length is a
    device tensor the forward advances (transformers' ``StaticCache``), and no per-step host hooks."""
    layers = getattr(cache, "layers", None)
    return (bool(layers) and getattr(cache, "compiled_step_tokens", None) is None
            and all(not getattr(layer, "is_sliding", False)
                    and isinstance(getattr(layer, "cumulative_length", None), torch.Tensor) for layer in layers))


@dataclass
class _Step:
    """One (tier, q, keep): its static input buffers, its graph (None: run un-captured) and the output it fills."""

    ids: torch.Tensor
    pos: torch.Tensor
    keep: int
    graph: torch.cuda.CUDAGraph | None = None
    out: object = None
    extra: dict = field(default_factory=dict)


class CapturedSteps:
    """The model's forward, one captured graph per (tier, query length, logits kept), over one static cache.

    Args:
        model: the causal LM.
        tiers: its ``prepare_tiers`` handle (the active tier is part of each graph's key), or None.
        compile_backend: ``torch.compile`` backend of the captured forward (None: the model's forward as it is).
        use_graphs: capture CUDA graphs (None: where the model is on CUDA).
    """

    def __init__(self, model: torch.nn.Module, tiers: PrecisionTiers | None = None,
                 compile_backend: str | None = "inductor", use_graphs: bool | None = None) -> None:
        self.model, self.tiers = model, tiers
        device = next(model.parameters()).device
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self.forward = (torch.compile(model.forward, backend=compile_backend, dynamic=False)
                        if compile_backend else model.forward)
        self.cache = None
        self.steps: dict[tuple, _Step] = {}
        self.captures = 0  # graphs captured so far (each after its warm-up runs)

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, use_cache: bool = True,
                 logits_to_keep: int = 1, **cache_kwargs):
        if len(cache_kwargs) != 1:
            raise TypeError("CapturedSteps: pass the cache as the model's one cache keyword, got "
                            f"{sorted(cache_kwargs)}")
        (name, cache), = cache_kwargs.items()
        if cache is not self.cache:
            if not supports(cache):
                raise ValueError(f"CapturedSteps: {type(cache).__name__} is not a static cache whose length the "
                                 "forward advances on the device; use transformers' StaticCache, or run the "
                                 "forwards through generate's compiled call")
            self.cache, self.steps = cache, {}
        key = (self.tiers.active if self.tiers is not None else None, tuple(input_ids.shape), int(logits_to_keep))
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = _Step(torch.empty_like(input_ids), torch.empty_like(position_ids),
                                           int(logits_to_keep), extra={name: cache})
            step.ids.copy_(input_ids)
            step.pos.copy_(position_ids)
            self._warm_up(step, input_ids.shape[1])
            if self.use_graphs:
                self._capture(step)
        else:
            step.ids.copy_(input_ids)
            step.pos.copy_(position_ids)
        if step.graph is None:
            return self._run(step)
        step.graph.replay()
        return step.out

    def _run(self, step: _Step):
        return self.forward(input_ids=step.ids, position_ids=step.pos, use_cache=True, logits_to_keep=step.keep,
                            **step.extra)

    def _warm_up(self, step: _Step, q: int) -> None:
        """``WARMUP_RUNS`` forwards (the first compiles), on a side stream on CUDA as capture requires, each taken back
        off the cache: the KV they wrote lies past its length, where the real forward writes next."""
        cuda = step.ids.is_cuda
        stream = torch.cuda.Stream() if cuda else None
        if cuda:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if cuda else nullcontext():
            for _ in range(WARMUP_RUNS):
                self._run(step)
                crop_cache(self.cache, q)
        if cuda:
            torch.cuda.current_stream().wait_stream(stream)

    def _capture(self, step: _Step) -> None:
        """The capture, after the warm-up: it records the forward (and its length advance) without running it."""
        step.graph = torch.cuda.CUDAGraph()
        with graph_capture(step.graph):
            step.out = SimpleNamespace(logits=self._run(step).logits)
        self.captures += 1
