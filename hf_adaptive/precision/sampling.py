"""Token sampling with no host synchronisation: the exponential race.

Contract: ``sample_tokens(logits, temperature, generator)`` draws one token per row of (B, V) logits from
``softmax(logits / temperature)`` and returns (B,) int64 on the logits' device, using only elementwise ops and an
argmax: ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. picks index i with probability ``p_i`` (the smallest of the
independent ``E_i / p_i ~ Exp(p_i)`` wins with probability ``p_i / sum p``). ``torch.multinomial`` computes the same
distribution but may read back to the host on CUDA, which stalls a CUDA-graph decode loop once per token.
"""

from __future__ import annotations

import torch


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One sampled token per row of (B, V) logits, on their device, with no host sync.

    Args:
        logits: (B, V) raw or processed logits (any float dtype; the race runs in fp32).
        temperature: > 0; the logits are divided by it before the softmax.
        generator: a ``torch.Generator`` on the logits' device for reproducible draws (None: the global one).
    Returns:
        (B,) int64 token ids.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_tokens: logits must be (B, V), got shape {tuple(logits.shape)}; "
                         "pass logits[:, -1, :] for a (B, T, V) model output")
    if not temperature > 0:
        raise ValueError(f"sample_tokens: temperature must be > 0, got {temperature}; use argmax for greedy decoding")
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)  # (B, V) ~ Exp(1)
    # a draw of exactly 0 would make 0 / 0 = NaN at a forbidden (p = 0) token, and argmax prefers NaN
    race.clamp_min_(torch.finfo(torch.float32).tiny)
    return (probs / race).argmax(dim=-1)
