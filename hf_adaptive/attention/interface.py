"""transformers glue: ``attn_implementation="hf_adaptive"`` reads packed KV layers directly.

The hand-off between a cache layer and this attention function is the key tensor itself. A cache
layer whose history is packed returns, from ``update()``, a key tensor marked with
:func:`attach_packed_view` (any cheap tensor: its values are not read); the attention function finds
the :class:`~hf_adaptive.kv.packed.PackedKV` on it with :func:`packed_view_of`. The modeling code passes
``update()``'s key straight to the attention function in every supported architecture, so no global
state, no registry keyed by layer index, and several caches can be alive at once.

Dispatch:
- packed layer, q_len == 1 (decode): the fused Triton kernel on CUDA, the torch reference elsewhere;
- packed layer, q_len > 1 (prefill / chunked prefill): dequantize-gather, then sdpa;
- ordinary layer (e.g. a sliding-window layer, or no cache): transformers' sdpa, unchanged;
- a ``softcap`` (Gemma-2 style), which sdpa lacks: the float32 reference on dense tensors.
Masks are built by transformers' own sdpa mask function, registered under the same name.
"""

from __future__ import annotations

import logging

import torch

from hf_adaptive.attention import triton_decode
from hf_adaptive.attention.reference import dense_attention, gather_packed_kv, reference_decode_attention
from hf_adaptive.attention.static_op import static_decode_attention
from hf_adaptive.kv.packed import PackedKV, attach_packed_view, packed_view_of  # noqa: F401  (the hand-off)

logger = logging.getLogger(__name__)

ATTENTION_NAME = "hf_adaptive"


def register_attention(name: str = ATTENTION_NAME) -> str:
    """Register the attention function and its mask builder with transformers; idempotent.

    After this, ``from_pretrained(..., attn_implementation="hf_adaptive")`` or
    ``model.set_attn_implementation("hf_adaptive")`` routes attention through :func:`adaptive_attention_forward`.
    Returns the registered name.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, adaptive_attention_forward)
    # the same masks sdpa gets: bool (B, 1, q_len, N), or None where sdpa may skip the mask
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping["sdpa"])
    return name


def adaptive_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (signature of ``sdpa_attention_forward``).

    Args:
        module: the attention module (only read by the sdpa fallback).
        query: (B, Hq, q_len, D). key, value: (B, H, S, D), or handles marked by :func:`attach_packed_view`.
        attention_mask: transformers' sdpa mask, (B|1, 1, q_len, N) bool, or None.
        dropout, scaling, softcap, sliding_window: as in transformers' attention functions.
    Returns:
        (attention output (B, q_len, Hq, D), None) — no attention weights.
    """
    packed = packed_view_of(key)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if query.shape[2] > 1 and query.is_cuda and not torch.compiler.is_compiling():
        # a prefill runs eagerly before any captured decode step: make the kernel's placeholder tensors here, outside
        # any CUDA-graph pool (made during a cudagraph-trees warm-up they would stay in its pool untracked)
        triton_decode.warm_placeholders(query.device, query.dtype)
    if packed is not None and packed.lengths is not None:
        if query.shape[2] != 1 or dropout:
            raise ValueError(f"a static packed view serves decode steps only (q_len 1, no dropout); got q_len "
                             f"{query.shape[2]}, dropout {dropout}. Its layer returns exact keys for prefill.")
        key_mask = key_mask_from_hf(attention_mask, query.shape[0], packed.max_tokens)  # a field: one guard
        if key_mask is False:
            raise ValueError("per-head attention masks are not supported over a static packed view; pass a "
                             "(B, 1, 1, N) mask (transformers' default).")
        out = static_decode_attention(query, packed, scaling=scaling, softcap=softcap, key_mask=key_mask,
                                      tail_k=key, tail_v=value)
        return out.transpose(1, 2).contiguous(), None
    if packed is not None and query.shape[2] == 1 and not dropout:
        out = decode_attention(query, packed, scaling=scaling, softcap=softcap, sliding_window=sliding_window,
                               attention_mask=attention_mask)
        return out.transpose(1, 2).contiguous(), None
    if packed is not None:  # prefill over a packed history: exact-enough dense copy, then the usual path
        key, value = gather_packed_kv(packed, query.dtype)
    if softcap is not None:
        out = dense_attention(query, key, value, scaling=scaling, softcap=softcap, sliding_window=sliding_window,
                              attention_mask=attention_mask)
        return out.transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  sliding_window=sliding_window, **kwargs)


def decode_attention(
    query: torch.Tensor,
    packed: PackedKV,
    *,
    scaling: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step over a packed layer: the fused kernel on CUDA (with triton), the reference elsewhere.

    Args:
        query: (B, Hq, 1, D). attention_mask: transformers' mask (B|1, 1|Hq, 1, N) bool/additive, or None.
        Other arguments as :func:`hf_adaptive.attention.triton_decode.triton_decode_attention`.
    Returns:
        (B, Hq, 1, D) in the query's dtype.
    """
    key_mask = key_mask_from_hf(attention_mask, query.shape[0], packed.num_tokens)
    if query.is_cuda and triton_decode.HAS_TRITON and key_mask is not False:
        return triton_decode.triton_decode_attention(query, packed, scaling=scaling, softcap=softcap,
                                                     sliding_window=sliding_window, key_mask=key_mask)
    return reference_decode_attention(query, packed, scaling=scaling, softcap=softcap, sliding_window=sliding_window,
                                      attention_mask=attention_mask)


def key_mask_from_hf(attention_mask: torch.Tensor | None, batch: int, n_keys: int) -> torch.Tensor | None | bool:
    """A decode-step transformers mask as a (B, N) bool key mask (True = attend).

    Returns None when there is no mask, and False when the mask differs per head (the fused kernel takes
    one key mask per sequence; the reference handles that case).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[-2] != 1 or attention_mask.shape[-1] != n_keys:
        raise ValueError(
            f"attention_mask for a decode step over a packed layer of N={n_keys} tokens must be (B, 1, 1, N); got "
            f"{tuple(attention_mask.shape)}. The cache layer's get_mask_sizes() must report kv_length = N.")
    if attention_mask.shape[1] != 1:
        return False
    row = attention_mask[:, 0, 0, :]
    if row.dtype != torch.bool:  # additive masks hold 0 where attended and a very negative number elsewhere
        row = row > torch.finfo(row.dtype).min / 2
    return row.expand(batch, n_keys)
