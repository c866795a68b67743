"""One call to make a model's decode read the adaptive KV cache's packed layout directly.

``enable_fused_attention(model)`` registers ``attn_implementation="hf_adaptive"`` with transformers and
switches the model to it (``set_attn_implementation``, present in transformers 5.17 and 5.24). An
:class:`~hf_adaptive.kv.cache.AdaptiveKVCache` with ``packed_attention="auto"`` (the default) then hands
decode steps the packed view: the fused Triton kernel on CUDA, the torch reference elsewhere.

It also installs two forward hooks that run eagerly around every forward, also when ``generate`` compiles
the step: a cache with ``begin_step(q)`` / ``end_step()`` (:class:`~hf_adaptive.kv.static.AdaptiveStaticKVCache`)
does its host work there (pressure, policy, block moves), so the compiled region holds only tensor ops.
"""

from __future__ import annotations

import logging

import torch

from hf_adaptive.attention.interface import ATTENTION_NAME, register_attention

logger = logging.getLogger(__name__)


def enable_fused_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Route ``model``'s attention through ``"hf_adaptive"`` (packed-KV decode); returns ``model``.

    Layers without a packed cache (sliding windows, prefill, other caches) keep transformers' sdpa path,
    so the switch is safe for any cache. Undo with ``model.set_attn_implementation("sdpa")``.
    """
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise ValueError(f"model must be a transformers PreTrainedModel with set_attn_implementation(); got "
                         f"{type(model).__name__}. Fix: pass the model returned by from_pretrained / load_model.")
    register_attention(ATTENTION_NAME)
    setter(ATTENTION_NAME)
    install_step_hooks(model)
    logger.info("attention implementation set to %r (packed-KV decode)", ATTENTION_NAME)
    return model


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
