"""Verified (lossless) mode: the fast tier drafts, the top tier verifies, output = top-tier greedy.

Contract: ``generate_verified(engine, input_ids, DecodeOptions(draft=DraftOptions(...)))`` returns (1, max_new_tokens)
tokens identical to greedy decoding in the top tier (up to the floating-point difference between a
multi-token and a one-token forward, as in every speculative decoder). Each round:

1. ``k = draft_length(score)`` from the top tier's confidence in the last token (policy band: full
   ``max_draft`` when confident, half in the mid band, 0 below ``low``: then the top tier decodes alone);
2. the fast tier drafts ``k`` tokens greedily, one graph replay each, writing its KV at p..p+k-1;
3. the top tier runs [last, d_0..d_{k-1}] (padded to ``max_draft + 1``: one captured graph) at p..,
   overwriting that KV with top-tier KV; the longest prefix where d_i equals the top tier's argmax is
   accepted, plus the top tier's own next token. Positions after the accepted ones hold stale KV that
   the mask hides and the next round overwrites, so "cropping" the static cache is a position reset.

Near-ties (``DraftOptions.tie_margin_steps``): the verify forward (Q = max_draft + 1) and a 1-token forward run
different GEMM shapes, so in bf16 their logits differ by rounding, and where the top-2 gap is that small they can pick
different tokens (measured on an H100 under torch.compile: a gap of one bf16 step flipped a token). A verify row
whose top-2 gap is within ``tie_margin_steps`` rounding steps decides nothing: the round keeps the drafts
verified at rows before it and decides that position with a 1-token top-tier forward, the shape greedy uses.

One host read per round (accepted count, first near-tie row, confidences). Batch size 1 only.
"""

from __future__ import annotations

import torch

from hf_adaptive.policy.precision_policy import draft_length
from hf_adaptive.precision.confidence import confidence_score
from hf_adaptive.precision.graph_decode import GraphDecodeEngine
from hf_adaptive.precision.options import DecodeOptions, DraftOptions


def _check(engine: GraphDecodeEngine, input_ids: torch.Tensor, opts: DecodeOptions) -> DraftOptions:
    """The draft settings of ``opts``, once the call is one verified mode can run."""
    if opts.draft is None:
        raise ValueError("generate_verified: DecodeOptions.draft must be a DraftOptions; got None. "
                         "Fix: DecodeOptions(max_new_tokens=32, draft=DraftOptions(max_draft=4))")
    opts.refuse("generate_verified", ("controller", "schedule", "tier", "do_sample", "agreement_every",
                                      "decision_lag"),
                "verified mode is greedy and picks its own tiers; use decode() or FusedStepDecoder for those")
    if input_ids.shape[0] != 1:
        raise ValueError(f"generate_verified: batch size must be 1, got {input_ids.shape[0]}; "
                         "use decode() with a PrecisionController for batches")
    if engine.config.verify_len != opts.draft.max_draft + 1:
        raise ValueError(f"generate_verified: engine verify_len={engine.config.verify_len} must be "
                         f"max_draft + 1 = {opts.draft.max_draft + 1}; build GraphDecodeConfig(verify_len=...)")
    return opts.draft


def _draft(engine: GraphDecodeEngine, tier: str, last: torch.Tensor, k: int) -> tuple[list, list]:
    """k greedy fast-tier tokens after ``last`` (1,), all on device; returns (tokens, their logits)."""
    tokens, logits = [], []
    tok = last
    for _ in range(k):
        step_logits = engine.forward(tier, tok[:, None])[:, -1]  # (1, V)
        tok = step_logits.argmax(-1)
        tokens.append(tok)
        logits.append(step_logits.clone())  # graph-owned output: keep a copy for the confidence
    return tokens, logits


def _verify_round(engine: GraphDecodeEngine, last: torch.Tensor, k: int, opts: DraftOptions):
    """One draft + verify round; returns (emitted tokens (n,), new last (1,), next score)."""
    start = engine.position
    drafts, draft_logits = _draft(engine, opts.tier or engine.tiers.fast, last, k)
    width = opts.max_draft + 1
    # (1, width) padded to the one captured verify width; with no draft the 1-token top graph does
    seq = torch.cat([last] + drafts + [last] * (width - 1 - k))[None] if k else last[None]
    top_logits = engine.forward(engine.tiers.top, seq, start)[0]      # (width or 1, V)
    greedy = top_logits.argmax(-1)                                     # (width,)
    if k:
        d = torch.cat(drafts)
        accepted = (d == greedy[:k]).int().cumprod(0).sum()
        draft_scores = confidence_score(torch.cat(draft_logits), opts.weights)
    else:
        accepted = torch.zeros((), dtype=torch.long, device=greedy.device)
        draft_scores = torch.zeros(0, device=greedy.device)
    next_score = confidence_score(top_logits, opts.weights)[accepted]
    # a round without a draft already ran the 1-token forward greedy runs: nothing to settle
    tie = _first_near_tie(top_logits[: k + 1], opts.tie_margin_steps if k else 0.0)
    # the one host read of the round
    host = torch.cat([accepted.float()[None], tie.float()[None], next_score[None], draft_scores]).tolist()
    n_acc, tie_row = int(host[0]), int(host[1])
    opts.history.append((k, n_acc))
    for i, s in enumerate(host[3:3 + min(n_acc + 1, k)]):
        opts.telemetry.record_agreement(s, i < n_acc)
    if tie_row <= n_acc:  # rows 0..n_acc decide the emitted tokens; one of them is a near-tie
        return _settle_tie(engine, last, drafts, start, tie_row, opts)
    emitted = torch.cat([d[:n_acc], greedy[n_acc:n_acc + 1]]) if k else greedy[:1]
    engine.position = start + n_acc + 1
    return emitted, greedy[n_acc:n_acc + 1], host[2]


def rounding_step(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype``'s representable values at ``magnitude`` (elementwise, as float32)."""
    return torch.exp2(torch.floor(torch.log2(magnitude.float().abs().clamp_min(1e-30)))) * torch.finfo(dtype).eps


def _first_near_tie(logits: torch.Tensor, margin_steps: float) -> torch.Tensor:
    """Index of the first row of (R, V) logits whose top-2 gap is <= ``margin_steps`` rounding steps of their
    dtype at the top logit's magnitude; R if none (0-d long tensor, on the device)."""
    rows = logits.shape[0]
    if margin_steps <= 0:
        return torch.full((), rows, dtype=torch.long, device=logits.device)
    top2 = logits.float().topk(2, dim=-1).values                        # (R, 2)
    near = (top2[:, 0] - top2[:, 1]) <= margin_steps * rounding_step(top2[:, 0], logits.dtype)  # (R,)
    return torch.where(near.any(), near.int().argmax(), torch.full_like(near.int().argmax(), rows)).long()


def _settle_tie(engine: GraphDecodeEngine, last: torch.Tensor, drafts: list, start: int, row: int,
                opts: DraftOptions):
    """Keep the ``row`` drafts verified before the near-tie row, then decide its position with a 1-token top-tier
    forward (the shape greedy decoding uses). Returns (emitted, new last, next score)."""
    opts.tie_rounds += 1
    kept = torch.cat(drafts[:row]) if row else last[:0]
    feed = drafts[row - 1] if row else last                            # (1,) the token at position start + row
    logits = engine.forward(engine.tiers.top, feed[:, None], start + row)[:, -1]  # (1, V)
    tok = logits.argmax(-1)
    score = confidence_score(logits, opts.weights)[0].item()
    engine.position = start + row + 1
    return torch.cat([kept, tok]), tok, score


@torch.no_grad()
def generate_verified(engine: GraphDecodeEngine, input_ids: torch.Tensor, opts: DecodeOptions) -> torch.Tensor:
    """Lossless draft-and-verify decode with the settings of ``opts.draft``; returns (1, max_new_tokens) ids.
    The rounds, near-tie count and telemetry are recorded in ``opts.draft``."""
    draft = _check(engine, input_ids, opts)
    n_new = opts.max_new_tokens
    logits = engine.prefill(input_ids)  # (1, V) top tier
    last = logits.argmax(-1)            # (1,)
    out, n_out = [last], 1
    score = confidence_score(logits, draft.weights).item()  # once per generation
    while n_out < n_new:
        wanted = draft_length(score, draft.max_draft, draft.policy) if draft.adaptive else draft.max_draft
        k = max(min(wanted, n_new - n_out - 1), 0)
        emitted, last, score = _verify_round(engine, last, k, draft)
        draft.telemetry.record_step(engine.tiers.fast if k else engine.tiers.top, [score])
        out.append(emitted)
        n_out += emitted.shape[0]
    return torch.cat(out)[None, :n_new]


@torch.no_grad()
def greedy_with_logits(engine: GraphDecodeEngine, input_ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference verified mode promises: top-tier greedy, one token per forward.

    Returns tokens (B, n) and the float32 logits (B, n, V) that chose them (for ``mismatch_report``).
    """
    logits, toks, seen = engine.prefill(input_ids), [], []
    for i in range(n):
        seen.append(logits.float().clone())
        toks.append(logits.argmax(-1))
        if i < n - 1:
            logits = engine.forward(engine.tiers.top, toks[-1][:, None])[:, -1]
    return torch.stack(toks, 1), torch.stack(seen, 1)


def mismatch_report(out: torch.Tensor, ref: torch.Tensor, ref_logits: torch.Tensor,
                    logit_dtype: torch.dtype) -> dict:
    """First position where ``out`` (1, n) differs from greedy ``ref`` (1, n), and whether it is a near-tie.

    The verify forward (Q = max_draft + 1) and the 1-token decode run different GEMM shapes, so their
    logits may differ by rounding. At the first mismatch i, ``gap`` = greedy's logit of its own token
    minus its logit of verified's token (from ``ref_logits`` (1, n, V)); ``step`` = the rounding step of
    ``logit_dtype`` at the top logit's magnitude. ``near_tie`` (gap <= 2 steps) means rounding can explain
    the mismatch; a larger gap means a logic bug. In fp32 the step is ~1e-6: any mismatch is a bug.
    """
    same = (out == ref)[0]
    if bool(same.all()):
        return {"token_identical": True, "first_mismatch": None}
    i = int((~same).nonzero()[0])
    row = ref_logits[0, i]
    gap = float(row[ref[0, i]] - row[out[0, i]])
    step = float(rounding_step(row.abs().max(), logit_dtype))
    return {"token_identical": False, "first_mismatch": i, "greedy_gap_at_mismatch": gap,
            "rounding_step": step, "near_tie": gap <= 2 * step}
