"""``generate``'s compiled decode step replayed from CUDA graphs captured once per tier: a tier switch is the replay
of another graph.

Usage::

    tiers = prepare_tiers(model, tiers=("int4", "native"))
    graphs = install_decode_graphs(model, tiers)
    with PrecisionController(tiers) as ctl:
        model.generate(**inputs, cache=StaticCache(config=model.config, max_cache_len=4096),
                       logits_processor=[ctl])
    graphs.remove()  # generate's own compiled call again

Why: ``generate`` compiles its decode step with ``torch.compile`` and cudagraph trees. Before every step dynamo checks
the guards of its cached graphs on the host, and the trees do their own bookkeeping; a tier switch makes dynamo try
the other tier's graph first, and the trees record a graph that follows a different one as a new path. On the 8B shape
an int4/native mix cost 5-26 % more than the mix of the two steps' times (``precision_generate_h100/overlap``). Here a
decode step is one lookup in a dict keyed by the tier and the inputs' shapes, a few small copies into static buffers
and one graph launch.

Contract:
- ``install_decode_graphs`` makes ``model.get_compiled_call`` (what ``generate`` compiles its decode step with) return
  a ``DecodeGraphs``. It serves the one-token forwards of a cache that keeps its length on the device and advances it
  in the forward (transformers' ``StaticCache``, ``step_graphs.supports``) through ``step_graphs.CapturedSteps``: the
  first step of a (tier, input shapes) compiles and captures (two warm-up runs taken back off the cache, then the
  capture), every later one replays. Every other forward (prefill, several tokens, another cache, unhashable
  inputs, more than ``max_graphs`` keys, attentions or hidden states asked for: generate keeps those across steps)
  goes to the compiled call ``generate`` would have used, counted in ``fallbacks`` with the reason.
- The model's own forward hooks (pre and post, e.g. ``PrecisionController``'s settle) run eagerly around each replay,
  as ``nn.Module.__call__`` would run them. Hooks of its submodules ran while the step was captured: their device
  work replays, their Python side effects do not (the tiered output projection's confidence is re-applied by
  ``CapturedSteps``).
- A replay's ``logits`` are graph-owned: ``generate`` copies them at once, and the next replay overwrites them.
- Graphs belong to one cache object: pass the same cache to later calls (``cache.reset()`` between them) to replay
  them; a new cache object captures again.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.modules import module as nn_module

from hf_adaptive.precision.step_graphs import CapturedSteps, cache_of, fed_tokens, supports
from hf_adaptive.precision.tiers import PrecisionTiers

logger = logging.getLogger(__name__)


class DecodeGraphs:
    """The decode step ``generate`` runs, as captured graphs per (tier, input shapes); see the module docstring.

    Args:
        model: the causal LM (a transformers model: it has ``get_compiled_call``).
        tiers: its ``prepare_tiers`` handle (the active tier keys the graphs), or None for an untiered model.
        max_graphs: keys captured per cache before new ones go to the compiled call (each capture compiles).
        compile_backend: ``torch.compile`` backend of the captured forward.
        use_graphs: capture CUDA graphs (None: where the model is on CUDA; off CUDA the compiled forward runs on
            the static buffers, un-captured).
    """

    def __init__(self, model: nn.Module, tiers: PrecisionTiers | None = None, max_graphs: int = 8,
                 compile_backend: str = "inductor", use_graphs: bool | None = None) -> None:
        if not callable(getattr(model, "get_compiled_call", None)):
            raise TypeError(f"DecodeGraphs: model must be a transformers model with get_compiled_call; got "
                            f"{type(model).__name__}. Fix: pass the PreTrainedModel that generate runs")
        if tiers is not None and not isinstance(tiers, PrecisionTiers):
            raise TypeError(f"DecodeGraphs: tiers must be the handle prepare_tiers returns or None; got "
                            f"{type(tiers).__name__}. Fix: tiers=prepare_tiers(model)")
        if tiers is not None and tiers.model is not model:
            raise ValueError("DecodeGraphs: tiers were prepared on another model. Fix: prepare_tiers(model) and pass "
                             "that handle")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"DecodeGraphs: max_graphs must be an int >= 1; got {max_graphs!r}. Fix: max_graphs=8")
        self.model, self.max_graphs = model, max_graphs
        self.steps = CapturedSteps(model, tiers, compile_backend, use_graphs)
        self.replays = 0  # decode forwards served by a captured (or, off CUDA, static-buffer) step
        self.fallbacks: Counter[str] = Counter()  # forwards sent to generate's compiled call, by reason
        self._compiled_call: Callable[..., Any] | None = None  # the call generate would have used
        self._previous: Callable[..., Any] | None = None  # the model's get_compiled_call before install
        self._installed: Callable[..., Any] | None = None
        self._shapes: set[tuple] = set()  # step shapes (keys but the tier) seen on the current cache

    @property
    def captures(self) -> int:
        """Graphs captured so far."""
        return self.steps.captures

    def install(self) -> DecodeGraphs:
        """Make ``model.get_compiled_call`` return this object (wrapping the one in place, which still serves the
        forwards this one does not). Returns self."""
        if self._installed is not None:
            return self
        model = self.model
        previous = model.get_compiled_call
        self._had_own = "get_compiled_call" in vars(model)

        def get_compiled_call(compile_config: Any = None) -> Callable[..., Any]:
            self._compiled_call = previous(compile_config)
            return self

        self._previous, self._installed = previous, get_compiled_call
        model.get_compiled_call = get_compiled_call  # an instance attribute: shadows the class's method
        return self

    def remove(self) -> None:
        """Give ``generate`` its own compiled call back and drop the graphs (idempotent)."""
        if self._installed is None:
            return
        if vars(self.model).get("get_compiled_call") is self._installed:
            if self._had_own:
                self.model.get_compiled_call = self._previous
            else:
                del self.model.get_compiled_call
        else:
            logger.warning("DecodeGraphs.remove: another wrapper sits on model.get_compiled_call; left in place")
        self._installed = None
        self.steps.cache, self.steps.steps = None, {}

    def __enter__(self) -> DecodeGraphs:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def _reason_to_fall_back(self, args: tuple, inputs: dict) -> tuple[str | None, tuple | None]:
        """(why this forward cannot replay a captured step, None where it can; its inputs' shape key). Decided
        before the model's hooks run, so a forward that falls back runs them in the compiled call, once."""
        if args:
            return "positional inputs", None
        if inputs.get("output_attentions") or inputs.get("output_hidden_states"):
            return "attentions or hidden states kept", None  # generate keeps them across steps: a replay overwrites
        try:
            if fed_tokens(inputs) != 1:
                return "not a one-token step", None
            cache = cache_of(inputs)
        except TypeError:
            return "no input ids, or several caches", None
        if cache is None or (cache is not self.steps.cache and not supports(cache)):
            return "cache without a device-side length", None
        if nn_module._global_forward_pre_hooks or nn_module._global_forward_hooks:
            return "global module hooks", None
        try:
            shapes = self.steps.shape_key(inputs, cache)
            hash(shapes)
        except TypeError:
            return "unhashable inputs", None
        if cache is not self.steps.cache:
            self._shapes = set()
        if shapes not in self._shapes and len(self._shapes) >= self.max_graphs:
            return f"more than max_graphs={self.max_graphs} step shapes", None
        self._shapes.add(shapes)
        return None, shapes

    def __call__(self, *args, **inputs):
        model = self.model
        reason, shapes = self._reason_to_fall_back(args, inputs)
        if reason is not None:
            if not self.fallbacks:
                logger.info("DecodeGraphs: a forward goes to generate's compiled call (%s)", reason)
            self.fallbacks[reason] += 1
            return (self._compiled_call or model)(*args, **inputs)  # it runs the model's hooks itself
        self.replays += 1
        inputs = _run_pre_hooks(model, inputs)  # as __call__ would: the controller's settle may switch tiers
        # a hook that takes the keyword inputs may have changed them: their shape key is taken again
        out = self.steps.run(inputs, None if model._forward_pre_hooks_with_kwargs else shapes)
        return _run_post_hooks(model, inputs, out)


def _run_pre_hooks(model: nn.Module, inputs: dict) -> dict:
    """The model's forward pre-hooks, in order, as ``nn.Module.__call__`` runs them for a call with keyword inputs
    only; the keyword inputs they leave."""
    args: tuple = ()
    for hook_id, hook in list(model._forward_pre_hooks.items()):
        if hook_id in model._forward_pre_hooks_with_kwargs:
            result = hook(model, args, inputs)
            if result is not None:
                args, inputs = result
                if args:
                    raise RuntimeError("DecodeGraphs: a forward pre-hook of the model gave it positional inputs, "
                                       "which a captured step cannot take. Fix: return them as keywords")
        elif hook(model, args) is not None:
            raise RuntimeError("DecodeGraphs: a forward pre-hook of the model replaced its positional inputs, which "
                               "generate does not pass. Fix: register it with with_kwargs=True, or remove it")
    return inputs


def _run_post_hooks(model: nn.Module, inputs: dict, output):
    """The model's forward hooks, in order, as ``nn.Module.__call__`` runs them for a call with keyword inputs only;
    the output they leave."""
    for hook_id, hook in list(model._forward_hooks.items()):
        if hook_id in model._forward_hooks_with_kwargs:
            result = hook(model, (), inputs, output)
        else:
            result = hook(model, (), output)
        if result is not None:
            output = result
    return output


def install_decode_graphs(model: nn.Module, tiers: PrecisionTiers | None = None, **options) -> DecodeGraphs:
    """Replay ``generate``'s one-token decode steps on a ``StaticCache`` from CUDA graphs captured once per (tier,
    input shapes); ``options`` go to :class:`DecodeGraphs`. ``remove()`` on the result (or a ``with`` block) undoes
    it."""
    return DecodeGraphs(model, tiers, **options).install()
