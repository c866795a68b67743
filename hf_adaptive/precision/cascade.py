"""The lossless draft cascade as a decoding loop that ``model.generate`` runs (its ``custom_generate`` hook).

Contract: with ``tiers = prepare_tiers(model, ...)`` and ``gen = CascadeCandidateGenerator(tiers)``::

    out = model.generate(ids, custom_generate=cascade_decoding, candidate_generator=gen, max_new_tokens=64)

returns the same tokens as ``model.generate(ids, do_sample=False, max_new_tokens=64)`` with the top tier active and
the same cache settings (batch 1, greedy). ``generate`` prepares the inputs, the cache (``DynamicCache``, or the one
passed as ``cache=`` / ``past_key_values=``: ``StaticCache``, ``AdaptiveKVCache``, ``AdaptiveStaticKVCache``), the
logits processors and the stopping criteria, then calls this loop. transformers' assisted path builds its candidate
generator itself (prompt lookup, assistant model, early exit) with no argument to pass one in, hence its documented
``custom_generate`` callable hosts this loop, which mirrors that path for greedy decoding:

1. prefill at the top tier: the first token, as greedy decoding makes it;
2. per round the generator drafts k >= 0 tokens (prompt lookup, or the int4 self-draft from the same cache);
3. ONE top-tier forward over [last token, drafts] gives k + 1 rows of logits; the longest prefix of drafts equal to
   the rows' argmax (after the logits processors) is kept, plus the token of the first row that disagreed;
4. the cache entries of the rejected drafts are cropped; the kept count and the top tier's confidence in the
   emitted token come back in one host read (the EOS and stop checks after it read tensors already computed);
   EOS and ``max_length`` cut the kept tokens as in greedy decoding.

Compiled rounds: where ``generate`` would compile its decode step (a compileable cache such as ``StaticCache`` or
``AdaptiveStaticKVCache`` on an accelerator, ``disable_compile`` not set; ``compile_config`` is honoured), the
cascade runs its decode forwards through that same compiled call (``model.get_compiled_call``), at fixed shapes so
that each is one captured graph (cudagraph trees'; or, on a ``StaticCache`` with the generator's ``step_graphs``
on (the default), a graph the cascade captures itself, whose replay skips dynamo's per-call guards): a verify feeds one of
``verify_widths(num_drafting_tokens)`` tokens (1 for a
draft-less round, i.e. generate's own decode step; a draft is padded with its last token up to the next width, the
padded rows computed and ignored: at batch 1 a step reads the weights once however many rows it has), and the
self-draft's one-token steps run the int4 tier's own graph. A verify that would not fit the cache's
``max_cache_len`` at its width runs eagerly at its own width (size the cache at prompt + new tokens +
``num_drafting_tokens`` to keep every round compiled). The prefill runs eagerly, as in ``generate``. Elsewhere every
forward runs eagerly at the draft's own width.

The top tier's forward over k + 1 tokens and greedy's one-token forwards run different matmul shapes; in fp32 their
logits agree to ~1e-6 (any token difference is a bug), in 16-bit a near-tie can flip as in every speculative decoder.
A cache that stores history blocks quantized (``AdaptiveKVCache`` under pressure or ``fixed_bits``) quantizes a
block at the forward that pushes it out of the exact tail; a k + 1 token forward does that up to k tokens earlier
than greedy decoding, so there the output is the cascade's own, not greedy's (exact while history stays 16-bit).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hf_adaptive.compat import (activate_past_recording, cache_kwarg_name, crop_cache, ensure_croppable,
                                forward_cache_kwargs)
from hf_adaptive.precision.capture import begin_graph_step
from hf_adaptive.precision.confidence import confidence_score
from hf_adaptive.precision.drafting import CascadeCandidateGenerator
from hf_adaptive.precision.step_graphs import supports

def _check(model, input_ids: torch.Tensor, generation_config, generator, cache) -> None:
    if not isinstance(generator, CascadeCandidateGenerator):
        raise TypeError(f"cascade_decoding: candidate_generator must be a CascadeCandidateGenerator, got "
                        f"{type(generator).__name__}; pass candidate_generator=CascadeCandidateGenerator(tiers)")
    if generator.tiers.model is not model:
        raise ValueError("cascade_decoding: candidate_generator was built for another model; build it from "
                         "prepare_tiers(model) of the model whose generate() runs")
    if input_ids.shape[0] != 1:
        raise ValueError(f"cascade_decoding: batch size must be 1, got {input_ids.shape[0]}; "
                         "generate one prompt at a time (transformers' assisted decoding has the same limit)")
    if generation_config.do_sample or (generation_config.num_beams or 1) != 1:
        raise ValueError(f"cascade_decoding: lossless drafting is greedy only; got do_sample="
                         f"{generation_config.do_sample}, num_beams={generation_config.num_beams}. "
                         "Fix: do_sample=False, num_beams=1")
    if generation_config.return_dict_in_generate:
        raise ValueError("cascade_decoding: return_dict_in_generate=True is not supported; it returns the token ids "
                         "(1, L). Fix: return_dict_in_generate=False; read candidate_generator.telemetry.report()")
    if generator.tiers.active != generator.tiers.top:
        raise ValueError(f"cascade_decoding: the verifier runs the active tier, which is {generator.tiers.active!r}, "
                         f"not the top tier {generator.tiers.top!r}. Fix: tiers.set({generator.tiers.top!r}) "
                         "before generate")


@dataclass(frozen=True)
class _Forwards:
    """How the loop runs its decode forwards: through ``step`` (``generate``'s compiled call, or the model) at one of
    ``widths`` tokens while that fits ``room`` cache slots, eagerly at the draft's own width otherwise (no widths:
    every forward eager). The self-draft's one-token steps always go through ``step``."""

    model: torch.nn.Module
    step: Callable
    widths: tuple[int, ...] = ()
    room: int | None = None

    def pick(self, tokens: int, start: int) -> int | None:
        """The compiled width for ``tokens`` real tokens fed at position ``start`` (None: run them eagerly)."""
        for width in self.widths:
            if width >= tokens and (self.room is None or start + width <= self.room):
                return width
        return None


def verify_widths(longest_draft: int) -> tuple[int, ...]:
    """The fixed verify widths of a compiled cascade whose drafts reach ``longest_draft`` tokens: one token (a
    draft-less round is a plain decode step), half of (longest + 2) and longest + 1 (8 -> 1, 5, 9: the default
    self-draft of at most 4 fits the middle one). Each is one captured graph; a draft is padded up to the next."""
    return tuple(sorted({1, (longest_draft + 2) // 2, longest_draft + 1}))


def _forwards(model, cache, generator: CascadeCandidateGenerator, generation_config, model_kwargs) -> _Forwards:
    """Compiled fixed-width rounds where ``generate`` would compile its decode step, eager rounds elsewhere. On a
    static cache (``step_graphs.supports``) with ``generator.step_graphs`` on, each compiled forward is a CUDA graph
    of its own (``CapturedSteps``), replayed without dynamo's per-call guard checks; otherwise ``generate``'s compiled
    call runs them. A cache whose compiled step takes one token only (``compiled_step_tokens = 1``:
    ``AdaptiveStaticKVCache``) compiles the self-draft's steps and the draft-less rounds, and verifies drafts
    eagerly."""
    if not (getattr(cache, "is_compileable", False)
            and model._valid_auto_compile_criteria(model_kwargs, generation_config)):
        return _Forwards(model, model)
    room = getattr(cache, "max_cache_len", None)
    room = int(room) if room is not None else None
    if generator.step_graphs and supports(cache):
        return _Forwards(model, generator.captured_steps(generation_config.compile_config),
                         verify_widths(generator.num_drafting_tokens), room)
    step = model.get_compiled_call(generation_config.compile_config)
    if getattr(cache, "compiled_step_tokens", None) == 1:
        return _Forwards(model, step, (1,), room)
    return _Forwards(model, step, verify_widths(generator.num_drafting_tokens), room)


def _forward(call, model, cache, tokens: torch.Tensor, start: int, keep: int) -> torch.Tensor:
    """Top-tier logits (1, keep, V) of the last ``keep`` positions of ``tokens`` (1, q) fed at ``start``,
    through ``call`` (the model, or its compiled call)."""
    pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]  # (1, q)
    begin_graph_step(call, model)
    return call(input_ids=tokens, position_ids=pos, use_cache=True, logits_to_keep=keep,
                **forward_cache_kwargs(model, cache)).logits


def _verify(forwards: _Forwards, cache, candidates: torch.Tensor, cur_len: int,
            logits_processor) -> tuple[torch.Tensor, ...]:
    """One forward over [last, drafts] (padded to a compiled width where one fits); returns (raw logits (1, k+1, V)
    fp32 of the drafts' rows, greedy tokens (1, k+1), matches 0-d, tokens fed)."""
    k = candidates.shape[1] - cur_len
    fed = candidates[:, cur_len - 1:]  # (1, k + 1)
    width = forwards.pick(k + 1, cur_len - 1)
    call = forwards.model if width is None else forwards.step
    if width is not None and width > k + 1:
        fed = torch.cat([fed, fed[:, -1:].expand(1, width - k - 1)], dim=1)  # (1, width): padded, rows ignored
    logits = _forward(call, forwards.model, cache, fed, cur_len - 1, fed.shape[1])  # (1, q, V)
    raw = logits[:, :k + 1].to(torch.float32, copy=True)  # a copy: a graph's output is reused by its next replay
    processed = raw.clone()
    for i in range(k + 1):  # row i picks the token after candidates[:, :cur_len + i]
        processed[:, i] = logits_processor(candidates[:, :cur_len + i], processed[:, i])
    greedy = processed.argmax(-1)  # (1, k+1)
    matches = (candidates[0, cur_len:] == greedy[0, :k]).int().cumprod(0).sum()  # 0-d, on device
    return raw, greedy, matches, fed.shape[1]


def _eos(generation_config) -> torch.Tensor | None:
    """The stop token ids of the generation config as a 1-D tensor (None: no EOS stop)."""
    eos = generation_config.eos_token_id
    return None if eos is None else torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos])


def _cut(tokens: torch.Tensor, room: int, eos: torch.Tensor | None) -> torch.Tensor:
    """Kept tokens (1, n) cut to ``room`` and just after the first EOS, as greedy decoding would stop."""
    tokens = tokens[:, :room]
    if eos is not None:
        hits = torch.isin(tokens[0], eos.to(tokens.device)).nonzero()  # once per round: the round reads anyway
        if hits.numel():
            tokens = tokens[:, :int(hits[0]) + 1]
    return tokens


def _round(forwards: _Forwards, cache, generator: CascadeCandidateGenerator, input_ids: torch.Tensor,
           logits_processor, generation_config) -> torch.Tensor:
    """One draft + verify round; returns ``input_ids`` with the emitted tokens appended."""
    cur_len = input_ids.shape[1]
    candidates, _ = generator.get_candidates(input_ids)
    begin = time.perf_counter_ns()
    raw, greedy, matches, fed = _verify(forwards, cache, candidates, cur_len, logits_processor)
    score = confidence_score(raw[0], generator.weights)[matches]  # the top tier's confidence in its own token
    n, confidence = torch.stack([matches.float(), score]).tolist()  # the round's one host read
    kept = _cut(greedy[:, :int(n) + 1], generation_config.max_length - cur_len, _eos(generation_config))
    crop_cache(cache, fed - kept.shape[1])  # drop the KV of the rejected drafts, the padding and the tail past an EOS
    generator.update_candidate_strategy(input_ids, raw, kept.shape[1] - 1, confidence=confidence,
                                        verify_ns=time.perf_counter_ns() - begin)
    return torch.cat([input_ids, kept], dim=1)


@torch.no_grad()
def cascade_decoding(model, input_ids: torch.LongTensor, logits_processor, stopping_criteria, generation_config,
                     candidate_generator: CascadeCandidateGenerator | None = None, **model_kwargs) -> torch.LongTensor:
    """The ``custom_generate`` loop of ``model.generate``: lossless drafting, verified by the top tier.

    Args:
        model: the model whose ``generate`` runs (passed by ``generate``).
        input_ids: (1, L) prompt ids (passed by ``generate``).
        logits_processor, stopping_criteria, generation_config: prepared by ``generate``.
        candidate_generator: a ``CascadeCandidateGenerator`` of this model (``generate(...,
            candidate_generator=gen)``); its ``telemetry`` accumulates the rounds.
        model_kwargs: the rest of ``generate``'s model inputs; the cache is read from them.
    Returns:
        (1, L + new) token ids, like ``generate`` with ``return_dict_in_generate=False``.
    """
    cache = model_kwargs.get(cache_kwarg_name())
    _check(model, input_ids, generation_config, candidate_generator, cache)
    mask = model_kwargs.get("attention_mask")  # generate drops an all-ones mask: one left here masks a token
    if mask is not None and not bool(mask.all()):
        raise ValueError("cascade_decoding: the attention_mask masks prompt tokens (padding); the cascade feeds the "
                         "prompt unpadded. Fix: pass the prompt without padding (batch 1 needs none)")
    if cache is None or not ensure_croppable(cache):
        raise ValueError("cascade_decoding: needs a croppable cache; got "
                         f"{type(cache).__name__}. Fix: use_cache=True and a DynamicCache, StaticCache, "
                         "AdaptiveKVCache or AdaptiveStaticKVCache")
    if hasattr(cache, "activate_past_recording"):  # sliding-window layers keep what a crop may restore
        activate_past_recording(cache, candidate_generator.num_drafting_tokens)
    forwards = _forwards(model, cache, candidate_generator, generation_config, model_kwargs)
    candidate_generator.bind(cache, _eos(generation_config), generation_config.max_length,
                             forward=forwards.step)
    past = int(cache.get_seq_length())  # a cache carried over from an earlier call holds a prefix
    logits = _forward(model, model, cache, input_ids[:, past:], past, 1)[:, -1].float()  # (1, V)
    first = logits_processor(input_ids, logits).argmax(-1, keepdim=True)  # (1, 1)
    input_ids = torch.cat([input_ids, first], dim=1)
    candidate_generator.score = float(confidence_score(logits, candidate_generator.weights)[0])
    while not bool(stopping_criteria(input_ids, None).all()):
        input_ids = _round(forwards, cache, candidate_generator, input_ids, logits_processor, generation_config)
    return input_ids
