"""Lossy tier-switching decode on a ``GraphDecodeEngine``: every step replays the chosen tier's graph.

This is the general loop (sampling, agreement checks) with the controller's confidence ops and token
pick run eagerly between graph replays; for greedy decoding ``fused_decode.FusedStepDecoder`` moves
both into the captured step (measured controller overhead: see eval/bench_precision.py).

Contract: ``decode(engine, input_ids, DecodeOptions(...))`` returns the new tokens (B, max_new_tokens). The tier of
each step comes from, in this order: a ``PrecisionController`` (decides from the raw logits of the step
before), a recorded ``schedule`` (tier names, replayed cyclically: for benchmarks on random weights), or
the fixed ``tier`` (default: the top tier). ``decision_lag=1`` lets the controller decide from the step
before the last one, so the host never waits for the GPU (the default is lag 0). It decodes
exactly ``max_new_tokens`` (no EOS stop: a stop check would add a host sync per step). With
``agreement_every=N``, every N-th low-tier step also runs the top tier on the same input first and
records whether both pick the same token (telemetry's confidence accuracy); the low tier runs second
so its KV is what the lossy run keeps.
"""

from __future__ import annotations

import torch

from hf_adaptive.precision.confidence import confidence_score
from hf_adaptive.precision.graph_decode import GraphDecodeEngine
from hf_adaptive.precision.options import DecodeOptions
from hf_adaptive.precision.sampling import sample_tokens


def pick_tokens(logits: torch.Tensor, opts: DecodeOptions) -> torch.Tensor:
    """(B, V) logits -> (B,) tokens, greedy or sampled (the exponential race), on device (no host sync)."""
    if not opts.do_sample:
        return logits.argmax(-1)
    return sample_tokens(logits, opts.temperature, opts.generator)


def _next_tier(engine: GraphDecodeEngine, logits: torch.Tensor, step: int, opts: DecodeOptions) -> str:
    if opts.controller is not None:
        observe = opts.controller.observe_lagged if opts.decision_lag else opts.controller.observe
        return observe(logits)
    if opts.schedule:
        return opts.schedule[step % len(opts.schedule)]
    return opts.tier or engine.tiers.top


def _check_agreement(engine: GraphDecodeEngine, tier: str, tok: torch.Tensor,
                     opts: DecodeOptions) -> torch.Tensor:
    """Top tier first, then ``tier``, both at the same position; records argmax agreement and returns
    the low tier's (B, V) logits. Host reads here are deliberate: only on sampled steps."""
    start = engine.position
    top = engine.forward(engine.tiers.top, tok[:, None], start)[:, -1].argmax(-1)
    low_logits = engine.forward(tier, tok[:, None], start)[:, -1]
    low = low_logits.argmax(-1)
    scores = confidence_score(low_logits).tolist()
    for s, agreed in zip(scores, (low == top).tolist()):
        opts.controller.telemetry.record_agreement(s, bool(agreed))
    return low_logits


@torch.no_grad()
def decode(engine: GraphDecodeEngine, input_ids: torch.Tensor, opts: DecodeOptions) -> torch.Tensor:
    """Prefill then ``opts.max_new_tokens`` decode steps; returns (B, max_new_tokens) token ids."""
    opts.refuse("decode", ("draft",), "verified mode runs through generate_verified(engine, input_ids, opts)")
    if opts.controller is not None:
        opts.controller.reset()
    logits = engine.prefill(input_ids)  # (B, V), top tier
    tier = _next_tier(engine, logits, 0, opts)
    out = []
    for step in range(opts.max_new_tokens):
        tok = pick_tokens(logits, opts)
        out.append(tok)
        if step == opts.max_new_tokens - 1:
            break
        sample = (opts.agreement_every and opts.controller is not None and tier != engine.tiers.top
                  and step % opts.agreement_every == 0)
        if sample:
            logits = _check_agreement(engine, tier, tok, opts)
        else:
            logits = engine.forward(tier, tok[:, None])[:, -1]
        tier = _next_tier(engine, logits, step + 1, opts)
    return torch.stack(out, dim=1)
