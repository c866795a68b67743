"""The lossless draft cascade as a decoding loop that ``model.generate`` runs (its ``custom_generate`` hook).

Contract: with ``tiers = prepare_tiers(model, ...)`` and ``gen = CascadeCandidateGenerator(tiers)``::

    out = model.generate(ids, custom_generate=cascade_decoding, candidate_generator=gen, max_new_tokens=64)

returns the same tokens as ``model.generate(ids, do_sample=False, max_new_tokens=64)`` with the top tier active and
the same cache settings (batch 1, greedy). ``generate`` prepares the inputs, the cache (``DynamicCache``, or the one
passed as ``cache=`` / ``past_key_values=``: ``StaticCache``, ``AdaptiveKVCache``, ``AdaptiveStaticKVCache``), the
logits processors and the stopping criteria, then calls this loop. Its forwards run eagerly (no compiled step): the
draft and verify forwards change their query length every round. transformers' assisted path builds its candidate generator itself (prompt lookup, assistant model, early
exit) with no argument to pass one in, hence its documented ``custom_generate`` callable hosts this loop, which
mirrors that path for greedy decoding:

1. prefill at the top tier: the first token, as greedy decoding makes it;
2. per round the generator drafts k >= 0 tokens (prompt lookup, or the int4 self-draft from the same cache);
3. ONE top-tier forward over [last token, drafts] gives k + 1 rows of logits; the longest prefix of drafts equal to
   the rows' argmax (after the logits processors) is kept, plus the token of the first row that disagreed;
4. the cache entries of the rejected drafts are cropped; the kept count and the top tier's confidence in the
   emitted token come back in one host read (the EOS and stop checks after it read tensors already computed);
   EOS and ``max_length`` cut the kept tokens as in greedy decoding.

The top tier's forward over k + 1 tokens and greedy's one-token forwards run different matmul shapes; in fp32 their
logits agree to ~1e-6 (any token difference is a bug), in 16-bit a near-tie can flip as in every speculative decoder.
A cache that stores history blocks quantized (``AdaptiveKVCache`` under pressure or ``fixed_bits``) quantizes a
block at the forward that pushes it out of the exact tail; a k + 1 token forward does that up to k tokens earlier
than greedy decoding, so there the output is the cascade's own, not greedy's (exact while history stays 16-bit).
"""

from __future__ import annotations

import time

import torch

from hf_adaptive.compat import cache_kwarg_name, forward_cache_kwargs
from hf_adaptive.precision.confidence import confidence_score
from hf_adaptive.precision.drafting import CascadeCandidateGenerator

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


def _forward(model, cache, tokens: torch.Tensor, start: int, keep: int) -> torch.Tensor:
    """Top-tier logits (1, keep, V) of the last ``keep`` positions of ``tokens`` (1, q) fed at ``start``."""
    pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]  # (1, q)
    return model(input_ids=tokens, position_ids=pos, use_cache=True, logits_to_keep=keep,
                 **forward_cache_kwargs(model, cache)).logits


def _verify(model, cache, candidates: torch.Tensor, cur_len: int, logits_processor) -> tuple[torch.Tensor, ...]:
    """One forward over [last, drafts]; returns (raw logits (1, k+1, V) fp32, greedy tokens (1, k+1), matches 0-d)."""
    k = candidates.shape[1] - cur_len
    raw = _forward(model, cache, candidates[:, cur_len - 1:], cur_len - 1, k + 1).float()  # (1, k+1, V)
    processed = raw.clone()
    for i in range(k + 1):  # row i picks the token after candidates[:, :cur_len + i]
        processed[:, i] = logits_processor(candidates[:, :cur_len + i], processed[:, i])
    greedy = processed.argmax(-1)  # (1, k+1)
    matches = (candidates[0, cur_len:] == greedy[0, :k]).int().cumprod(0).sum()  # 0-d, on device
    return raw, greedy, matches


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


def _round(model, cache, generator: CascadeCandidateGenerator, input_ids: torch.Tensor, logits_processor,
           generation_config) -> torch.Tensor:
    """One draft + verify round; returns ``input_ids`` with the emitted tokens appended."""
    cur_len = input_ids.shape[1]
    candidates, _ = generator.get_candidates(input_ids)
    begin = time.perf_counter_ns()
    raw, greedy, matches = _verify(model, cache, candidates, cur_len, logits_processor)
    score = confidence_score(raw[0], generator.weights)[matches]  # the top tier's confidence in its own token
    n, confidence = torch.stack([matches.float(), score]).tolist()  # the round's one host read
    kept = _cut(greedy[:, :int(n) + 1], generation_config.max_length - cur_len, _eos(generation_config))
    k = candidates.shape[1] - cur_len
    cache.crop(-(k - (kept.shape[1] - 1)))  # drop the rejected drafts' KV (and the tail past an EOS)
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
    if cache is None or not getattr(cache, "is_croppable", True):
        raise ValueError("cascade_decoding: needs a croppable cache; got "
                         f"{type(cache).__name__}. Fix: use_cache=True and a DynamicCache, StaticCache, "
                         "AdaptiveKVCache or AdaptiveStaticKVCache")
    if hasattr(cache, "activate_past_recording"):  # sliding-window layers keep what a crop may restore
        cache.activate_past_recording(recurrent_states_to_keep=candidate_generator.num_drafting_tokens)
    candidate_generator.bind(cache, _eos(generation_config), generation_config.max_length)
    prompt = input_ids[:, cache.get_seq_length():]  # a cache carried over from an earlier call holds a prefix
    logits = _forward(model, cache, prompt, cache.get_seq_length(), 1)[:, -1].float()  # (1, V)
    first = logits_processor(input_ids, logits).argmax(-1, keepdim=True)  # (1, 1)
    input_ids = torch.cat([input_ids, first], dim=1)
    candidate_generator.score = float(confidence_score(logits, candidate_generator.weights)[0])
    while not bool(stopping_criteria(input_ids, None).all()):
        input_ids = _round(model, cache, candidate_generator, input_ids, logits_processor, generation_config)
    return input_ids
