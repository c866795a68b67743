"""Dynamo's guards on the tiered linears in generate's compiled step: keep the ones that can change.

Before every compiled decode step dynamo checks, on the host, the guards of its cached graphs. ``prepare_tiers``
replaces every decoder linear with a ``TieredLinear``, and dynamo guards everything the step reads through them: the
formats dicts, the packed int4 tensors, the fused groups and their bookkeeping, and the one shared selector reached
through every linear, with identity checks between those paths. On the 32-layer guard benchmark
(``precision_guards_cpu``) that more than doubles the lookup of a plain model's step, and a tier switch adds to it:
dynamo first tries the other tier's graph, then checks this one's.

Of all that, only the selector's state changes after ``prepare_tiers`` returns: the active tier and the output
scores' weights. The rest is built once and never reassigned. ``lean_guard_flags`` (policy, pure) keeps every guard
that does not reach into a tiered linear's own attributes and, of those that do, one guard per distinct selector
attribute and guard kind (every linear shares one selector, so one check of ``selector.active`` stands for all).
``install`` (mechanism) makes ``model.get_compiled_call``, which ``generate`` asks for its compiled step, pass that
filter to ``torch.compile`` (``guard_filter_fn``), combined with a filter the caller's ``CompileConfig`` already
names.

What it gives up: an attribute of a tiered linear assigned by hand after ``prepare_tiers`` (a new ``bias``, a
replaced format) is not seen by an already compiled step; the module docstring of ``tiers`` says to prepare once and
leave the tiered modules alone. Hooks, inputs, shapes, global state and every module that is not a tiered linear keep
their guards.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

# attributes a TieredLinear (or its fused group) owns and fixes in prepare_tiers; guards through them can go
FIXED_ATTRIBUTES = frozenset({"formats", "group", "group_index", "group_slice", "is_output", "in_features",
                              "out_features", "bias"})
_MODULE_CHAIN = re.compile(r"(?:\._modules\['[^']*'\])+")
_CHILD = re.compile(r"\._modules\['([^']*)'\]")
_ATTRIBUTE = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)")
_SELECTOR = re.compile(r"\.selector(?=\.|$)")


def _split(name: str) -> tuple[str, str] | None:
    """A guard's source name -> (the dotted path of the deepest module it reaches, what follows that module), or None
    if the name does not go through a module child (``L['kwargs']['input_ids']``, globals...)."""
    match = None
    for match in _MODULE_CHAIN.finditer(name):
        pass
    if match is None:
        return None
    return ".".join(_CHILD.findall(match.group(0))), name[match.end():]


def lean_guard_flags(names: Sequence[str], kinds: Sequence[str], tiered_paths: frozenset[str]) -> list[bool]:
    """Which guards to keep (True), given each guard's source name and kind and the module paths of the tiered
    linears (as ``model.named_modules()`` names them).

    A guard is dropped when its name reaches a tiered linear and goes on into an attribute that linear fixed at
    preparation (``FIXED_ATTRIBUTES``), unless it reaches the shared selector: of those, the first of each (selector
    attribute, guard kind) is kept and its repeats through the other linears are dropped. Everything else is kept:
    the linear's hooks dicts and type, other modules, inputs, globals."""
    keep: list[bool] = []
    seen: set[tuple[str, str]] = set()
    for name, kind in zip(names, kinds):
        split = _split(name)
        if split is None or split[0] not in tiered_paths:
            keep.append(True)
            continue
        tail = split[1]
        selector = [m.start() for m in _SELECTOR.finditer(tail)]
        if selector:
            key = (tail[selector[-1]:], kind)
            keep.append(key not in seen)
            seen.add(key)
        else:
            first = _ATTRIBUTE.match(tail)
            keep.append(first is None or first.group(1) not in FIXED_ATTRIBUTES)
    return keep


GuardFilter = Callable[[Sequence[Any]], Sequence[bool]]


class TierGuardFilter:
    """A ``guard_filter_fn`` for ``torch.compile``: ``lean_guard_flags`` over dynamo's guard entries, and-ed with
    ``then`` (a filter the caller's config named) when given."""

    def __init__(self, tiered_paths: Iterable[str], then: GuardFilter | None = None) -> None:
        self.paths = frozenset(tiered_paths)
        self.then = then

    def __call__(self, entries: Sequence[Any]) -> list[bool]:
        flags = lean_guard_flags([e.name for e in entries], [e.guard_type for e in entries], self.paths)
        if self.then is not None:
            flags = [a and bool(b) for a, b in zip(flags, self.then(entries))]
        return flags


def supported() -> bool:
    """Whether this torch's ``torch.compile`` takes a ``guard_filter_fn`` (through its ``options``): the releases
    that do also ship ``torch.compiler``'s ready-made filters."""
    return callable(getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None))


def with_guard_filter(compile_config: Any, guard_filter: TierGuardFilter) -> Any:
    """A copy of transformers' ``CompileConfig`` whose ``torch.compile`` call also filters guards with
    ``guard_filter``, or ``compile_config`` itself where that cannot be said.

    ``torch.compile`` takes ``mode`` or ``options``, not both: an inductor ``mode`` becomes its options
    (``torch._inductor.list_mode_options``: "reduce-overhead" is ``{"triton.cudagraphs": True}``); dynamo's
    ``"eager"`` backend ignores a mode (``CompileConfig``'s default "reduce-overhead" included), so it is dropped.
    Another backend given a ``mode`` keeps its config unfiltered: its mode has no options form."""
    options = dict(compile_config.options or {})
    mode, backend = compile_config.mode, compile_config.backend
    if mode not in (None, "default") and backend != "eager":
        if backend != "inductor":
            return compile_config
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode), **options}
    theirs = options.get("guard_filter_fn")
    options["guard_filter_fn"] = guard_filter if theirs is None else TierGuardFilter(guard_filter.paths, then=theirs)
    config = copy.copy(compile_config)
    config.mode, config.options = None, options
    return config


def install(model: nn.Module, tiered: Iterable[nn.Module]) -> bool:
    """Make ``model.get_compiled_call`` (what ``generate`` compiles its decode step with) filter the guards of the
    ``tiered`` linears. Returns False, changing nothing, where the model has no ``get_compiled_call`` (not a
    transformers model) or torch has no guard filters.

    The filtered config is rebuilt only when ``generate`` passes a config unequal to the last one, so transformers'
    reuse of its compiled call (it compares the config with the last one it compiled) holds."""
    original = getattr(model, "get_compiled_call", None)
    if original is None or not supported():
        return False
    ids = {id(m) for m in tiered}
    guard_filter = TierGuardFilter(name for name, m in model.named_modules() if id(m) in ids)
    last: list[Any] = []  # [the config generate passed last, its filtered copy]

    def get_compiled_call(compile_config: Any = None) -> Callable[..., Any]:
        config = compile_config if compile_config is not None else model._default_compile_config()
        if not last or vars(last[0]) != vars(config):  # fields and transformers' _compile_all_devices
            seen = copy.copy(config)
            seen.options = None if config.options is None else dict(config.options)  # an in-place edit shows
            last[:] = [seen, with_guard_filter(config, guard_filter)]
        return original(last[1])

    model.get_compiled_call = get_compiled_call  # an instance attribute: shadows the class's method
    return True
