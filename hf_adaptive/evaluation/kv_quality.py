"""Quality measurements of a KV cache against ``DynamicCache`` (used by tests and eval/kv_quality.py).

Contract: pure measurement, no policy. Teacher forcing feeds a fixed token sequence through the model in
chunks, so from the second chunk on the model reads its history back from the cache under test (quantized
blocks included) exactly as it would during generation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from hf_adaptive.compat import forward_cache_kwargs, generate_cache_kwargs


@dataclass
class TeacherForced:
    """Per-token results of one teacher-forced pass over ids (1, L): predictions for positions 1..L-1."""

    nll: torch.Tensor  # (L - 1,) float64 negative log-likelihood of each next token
    top1: torch.Tensor  # (L - 1,) long argmax prediction at each position

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll.mean().item())


@torch.no_grad()
def teacher_forced(model, ids: torch.Tensor, cache, chunk_size: int) -> TeacherForced:
    """Feed ``ids`` (1, L) through ``model`` in chunks of ``chunk_size`` tokens using ``cache``."""
    logits = []
    for start in range(0, ids.shape[1], chunk_size):
        chunk = ids[:, start:start + chunk_size]
        out = model(input_ids=chunk, use_cache=True, **forward_cache_kwargs(model, cache))
        logits.append(out.logits[0].float())
    logp = torch.cat(logits)[:-1].log_softmax(-1)
    target = ids[0, 1:]
    return TeacherForced(-logp.gather(-1, target[:, None])[:, 0].double(), logp.argmax(-1))


@dataclass
class Agreement:
    """How a cache under test compares with DynamicCache on the same text."""

    top1_agreement: float  # teacher-forced: fraction of positions with the same argmax
    ppl_reference: float
    ppl_test: float
    greedy_match_prefix: int  # free-running greedy: tokens identical before the first divergence
    greedy_tokens: int

    @property
    def ppl_delta_fraction(self) -> float:
        return self.ppl_test / self.ppl_reference - 1.0


@dataclass
class Reference:
    """DynamicCache results on one text, computed once and compared against many caches."""

    forced: TeacherForced
    greedy: torch.Tensor  # (new_tokens,) greedy continuation of the prompt
    chunk_size: int
    prompt_tokens: int


@torch.no_grad()
def reference_run(model, ids: torch.Tensor, chunk_size: int, prompt_tokens: int, new_tokens: int) -> Reference:
    """Teacher-forced pass and greedy continuation with ``DynamicCache``."""
    forced = teacher_forced(model, ids, DynamicCache(config=model.config), chunk_size)
    return Reference(forced, _greedy(model, ids[:, :prompt_tokens], DynamicCache(config=model.config), new_tokens),
                     chunk_size, prompt_tokens)


def _greedy(model, prompt: torch.Tensor, cache, new_tokens: int) -> torch.Tensor:
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return model.generate(prompt, **gen, **generate_cache_kwargs(cache))[0, prompt.shape[1]:]


@torch.no_grad()
def compare(model, ids: torch.Tensor, make_cache: Callable[[], object], ref: Reference) -> tuple[Agreement, object]:
    """Agreement of the cache made by ``make_cache`` with ``ref``; also returns the teacher-forced cache."""
    cache = make_cache()
    test = teacher_forced(model, ids, cache, ref.chunk_size)
    b = _greedy(model, ids[:, :ref.prompt_tokens], make_cache(), len(ref.greedy))
    n = min(len(ref.greedy), len(b))
    mismatch = (ref.greedy[:n] != b[:n]).nonzero()
    prefix = int(mismatch[0, 0]) if len(mismatch) else n
    top1 = (ref.forced.top1 == test.top1).double().mean().item()
    return Agreement(top1, ref.forced.perplexity, test.perplexity, prefix, n), cache


def compare_with_dynamic(model, ids: torch.Tensor, make_cache: Callable[[], object], chunk_size: int,
                         prompt_tokens: int, new_tokens: int) -> Agreement:
    """:func:`reference_run` then :func:`compare` for one cache factory."""
    return compare(model, ids, make_cache, reference_run(model, ids, chunk_size, prompt_tokens, new_tokens))[0]
