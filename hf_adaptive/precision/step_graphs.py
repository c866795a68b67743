"""Decode forwards replayed from CUDA graphs captured once per (tier, width), over one static KV cache.

Why: through ``generate``'s compiled call (cudagraph trees) an 8B compiled step took 9.5 ms of wall time against
6.4 ms on the device (`precision_generate_h100/score_fallback_profile`): host work (dynamo's guard checks, the
trees' bookkeeping, the model's Python) of the size of an int4 step's device time, so a loop of back-to-back forwards
such as the cascade's self-draft likely runs at the host's pace. A graph captured once replays for a few launches of host time, so the device's time sets the step's cost.

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

import functools
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from hf_adaptive.compat import crop_cache
from hf_adaptive.precision.capture import graph_capture
from hf_adaptive.precision.tiers import PrecisionTiers

WARMUP_RUNS = 2  # the first compiles; the second runs what the capture will record


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {backend: its compiled forward}


def compiled_forward(model: torch.nn.Module, backend: str):
    """``model.forward`` compiled with ``backend`` (static shapes, no cudagraphs of its own), one per (model, backend)
    for the model's lifetime. Every ``CapturedSteps`` of a model shares it: a ``torch.compile`` wrapper of its own
    would compile each step again, and dynamo's recompile limit per code object, once reached, leaves the forward
    uncompiled. The class's function is compiled and bound here, so the cache holds no reference to the model."""
    per_backend = _COMPILED.setdefault(model, {})
    if backend not in per_backend:
        per_backend[backend] = torch.compile(type(model).forward, backend=backend, dynamic=False)
    return functools.partial(per_backend[backend], model)


def supports(cache) -> bool:
    """Whether ``cache`` can be driven by captured steps: every layer a full-attention static layer whose length is a
    device tensor the forward advances (transformers' ``StaticCache``), and no per-step host hooks."""
    layers = getattr(cache, "layers", None)
    return (bool(layers) and getattr(cache, "compiled_step_tokens", None) is None
            and all(not getattr(layer, "is_sliding", False)
                    and isinstance(getattr(layer, "cumulative_length", None), torch.Tensor) for layer in layers))


@dataclass
class _Step:
    """One key: static buffers for the tensor inputs, the other inputs as given, the graph (None: run un-captured),
    the output it fills, and the confidence the tiered output projection left while it was captured."""

    buffers: dict
    fixed: dict
    graph: torch.cuda.CUDAGraph | None = None
    out: object = None
    score: torch.Tensor | None = None

    def load(self, inputs: dict) -> None:
        for name, buffer in self.buffers.items():
            if isinstance(buffer, dict):  # a mask per attention type
                for part, tensor in buffer.items():
                    tensor.copy_(inputs[name][part])
            else:
                buffer.copy_(inputs[name])


def _is_tensor_input(value) -> bool:
    """A tensor, or a dict of tensors (transformers' attention mask per layer type)."""
    return isinstance(value, torch.Tensor) or (
        isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values()))


def _empty_like(value):
    return {k: torch.empty_like(v) for k, v in value.items()} if isinstance(value, dict) else torch.empty_like(value)


def _shape_key(value) -> tuple:
    if isinstance(value, dict):
        return tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in value.items()))
    return tuple(value.shape), value.dtype


def cache_of(inputs: dict):
    """The one cache among a forward's keyword inputs (an object with cache layers), or None."""
    caches = [value for value in inputs.values() if hasattr(value, "layers") and hasattr(value, "get_seq_length")]
    if len(caches) > 1:
        raise TypeError(f"CapturedSteps: one cache per forward, got {len(caches)}")
    return caches[0] if caches else None


class CapturedSteps:
    """The model's forward, one captured graph per (tier, input shapes and settings), over one static cache.

    Called with the model's keyword inputs; every tensor input must keep its shape for a key (``generate``'s compiled
    decode step and the cascade's fixed-width forwards do), every other input is part of the key. It calls the
    model's ``forward``, not the module, so the model's own forward hooks do not run, and a replay runs no Python at
    all: a side effect of the forward's Python is lost unless re-applied here (the tiered output projection's
    confidence is).

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
        self.forward = compiled_forward(model, compile_backend) if compile_backend else model.forward
        self.cache = None
        self.steps: dict[tuple, _Step] = {}
        self.captures = 0  # graphs captured so far (each after its warm-up runs)

    def __call__(self, **inputs):
        return self.run(inputs)

    def run(self, inputs: dict, shapes: tuple | None = None):
        """The forward of ``inputs`` (what ``__call__`` takes as keywords); ``shapes``: their ``shape_key``, where the
        caller computed it already for this call."""
        cache = cache_of(inputs)
        if cache is None:
            raise TypeError("CapturedSteps: pass the cache as the model's one cache keyword, got "
                            f"{sorted(inputs)}")
        if cache is not self.cache:
            if not supports(cache):
                raise ValueError(f"CapturedSteps: {type(cache).__name__} is not a static cache whose length the "
                                 "forward advances on the device; use transformers' StaticCache, or run the "
                                 "forwards through generate's compiled call")
            self.cache, self.steps = cache, {}
        scores = self._scores()
        key = (self.tiers.active if self.tiers is not None else None,
               scores.weights if scores is not None else None,  # a forward with the confidence is another graph
               *(shapes if shapes is not None else self.shape_key(inputs, cache)))
        step = self.steps.get(key)
        if step is None:
            tensors = {name: value for name, value in inputs.items() if _is_tensor_input(value)}
            fixed = {name: value for name, value in inputs.items() if name not in tensors}
            step = self.steps[key] = _Step({name: _empty_like(t) for name, t in tensors.items()}, fixed)
            step.load(inputs)
            self._warm_up(step, fed_tokens(inputs))
            if self.use_graphs:
                self._capture(step)
        else:
            step.load(inputs)
        if step.graph is None:
            return self._run(step)
        step.graph.replay()
        if scores is not None and step.score is not None:  # what the forward's Python would have set
            scores.score = step.score
        return step.out

    @staticmethod
    def shape_key(inputs: dict, cache) -> tuple:
        """The part of a graph key the inputs set: each tensor input's shape and dtype (of each entry, for a dict of
        tensors such as a mask per attention type), and every other input but ``cache`` (each must be hashable:
        ``hash`` of the key raises ``TypeError`` otherwise). The full key puts the active tier and the confidence
        weights of the tiered output projection before it."""
        tensors = sorted((name, _shape_key(v)) for name, v in inputs.items() if _is_tensor_input(v))
        others = sorted((name, value) for name, value in inputs.items()
                        if not _is_tensor_input(value) and value is not cache)
        return tuple(tensors), tuple(others)

    def _scores(self):
        return self.tiers.selector.output_scores if self.tiers is not None else None

    def _run(self, step: _Step):
        return self.forward(**step.buffers, **step.fixed)

    def _warm_up(self, step: _Step, q: int) -> None:
        """``WARMUP_RUNS`` forwards (the first compiles), on a side stream on CUDA as capture requires, each taken back
        off the cache: the KV they wrote lies past its length, where the real forward writes next."""
        cuda = next(self.model.parameters()).is_cuda
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
        """The capture, after the warm-up: it records the forward (and its length advance) without running it. The
        tiered output projection's confidence (``OutputScores``), which the forward's Python sets, is kept with the
        step and set again after each replay."""
        step.graph = torch.cuda.CUDAGraph()
        scores = self._scores()
        with graph_capture(step.graph):
            step.out = self._run(step)
        step.score = scores.score if scores is not None else None
        self.captures += 1


def fed_tokens(inputs: dict) -> int:
    """How many positions a forward writes to the cache: the query length of its ids or embeddings."""
    for name in ("input_ids", "inputs_embeds"):
        if isinstance(inputs.get(name), torch.Tensor):
            return inputs[name].shape[1]
    raise TypeError("CapturedSteps: the forward needs input_ids or inputs_embeds")

