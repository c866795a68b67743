"""Attention over the packed KV layout: a torch reference (CPU, oracle), a fused Triton decode kernel,
and the transformers ``AttentionInterface`` glue that picks between them. Importing has no side effects;
call :func:`hf_adaptive.attention.interface.register_attention` to make ``attn_implementation="hf_adaptive"``
available.
"""
