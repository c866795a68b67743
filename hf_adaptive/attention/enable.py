"""One call to make a model's decode read the adaptive KV cache's packed layout directly.

``enable_fused_attention(model)`` registers ``attn_implementation="hf_adaptive"`` with transformers and
switches the model to it (``set_attn_implementation``, present in transformers 5.17 and 5.24). An
:class:`~hf_adaptive.kv.cache.AdaptiveKVCache` with ``packed_attention="auto"`` (the default) then hands
decode steps the packed view: the fused Triton kernel on CUDA, the torch reference elsewhere.

It also installs the cache step hooks of :mod:`hf_adaptive.kv.hooks`: a cache with ``begin_step(q)`` /
``end_step()`` (:class:`~hf_adaptive.kv.static.AdaptiveStaticKVCache`) does its host work eagerly around every
forward (pressure, policy, block moves), so the compiled region holds only tensor ops.
"""

from __future__ import annotations

import logging

import torch

from hf_adaptive.attention.interface import ATTENTION_NAME, register_attention
from hf_adaptive.kv.hooks import install_step_hooks

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
