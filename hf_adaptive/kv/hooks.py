"""Step hooks: a cache's host work for one forward runs eagerly around it, also when ``generate`` compiles the step.

Contract: :func:`install_step_hooks` registers a forward pre-hook and a forward hook on a model; around every forward
they call ``begin_step(q)`` / ``end_step()`` on the cache passed to it (``cache=`` or ``past_key_values=``), when that
cache has them (:class:`~hf_adaptive.kv.static.AdaptiveStaticKVCache`: pressure, policy, block moves). Both hooks are
excluded from compilation, so the compiled region holds only tensor ops. Knows nothing about attention.
"""

from __future__ import annotations

import torch


def _cache_of(kwargs: dict):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache if hasattr(cache, "begin_step") else None


@torch.compiler.disable
def _before_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = _cache_of(kwargs)
    if cache is None:
        return
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None and args:
        tokens = args[0]
    if tokens is not None:
        cache.begin_step(int(tokens.shape[1]))


@torch.compiler.disable
def _after_forward(module: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
    cache = _cache_of(kwargs)
    if cache is not None:
        cache.end_step()


def install_step_hooks(model: torch.nn.Module) -> torch.nn.Module:
    """Run a cache's ``begin_step(q)`` / ``end_step()`` eagerly around each forward of ``model``; idempotent."""
    if getattr(model, "_hf_adaptive_step_hooks", False):
        return model
    model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    model.register_forward_hook(_after_forward, with_kwargs=True)
    model._hf_adaptive_step_hooks = True
    return model
