"""Translation runner: Spanish verses -> English with a chat model, greedy, batched with left padding.

Contract: ``translate(model, tokenizer, sources, setting, config)`` returns the hypotheses, the
generated token ids (without prompt, padding or anything after EOS) and timings, in the order of
``sources``. Batches are formed from length-sorted sources (less padding) and the results are put back
in order. ``max_new_tokens`` of a batch is ``new_tokens_factor`` x its longest source (in tokens).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hf_adaptive.evaluation.settings import Setting

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Translate this Spanish Bible verse into English. Reply with the translation only.\n\n{es}"


@dataclass(frozen=True)
class TranslationConfig:
    """How prompts are built and generation runs; recorded with the results.

    Attributes:
        prompt: template with an ``{es}`` field.
        batch_size: sequences per ``generate`` call.
        new_tokens_factor: ``max_new_tokens`` = factor x the batch's longest source in tokens.
        min_new_tokens_cap: lower bound of ``max_new_tokens`` (very short verses).
        use_chat_template: wrap the prompt in the tokenizer's chat template (instruct models).
    """

    prompt: str = DEFAULT_PROMPT
    batch_size: int = 8
    new_tokens_factor: float = 2.0
    min_new_tokens_cap: int = 16
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        if "{es}" not in self.prompt:
            raise ValueError(f"prompt must contain '{{es}}'; got {self.prompt!r}. Fix: add '{{es}}' where "
                             "the Spanish verse goes.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}. Fix: e.g. batch_size=8.")
        if self.new_tokens_factor <= 0:
            raise ValueError(f"new_tokens_factor must be > 0; got {self.new_tokens_factor}. Fix: e.g. 2.0.")


def build_prompt(tokenizer: Any, source: str, config: TranslationConfig) -> str:
    """The model input text for one source verse (chat-templated when the tokenizer has a template)."""
    text = config.prompt.format(es=source)
    if config.use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding (decoder-only batching) and a pad token (EOS when the model has none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def greedy_generation_kwargs(tokenizer: Any, max_new_tokens: int) -> dict[str, Any]:
    """Deterministic decoding settings (recorded with results)."""
    return {"do_sample": False, "num_beams": 1, "max_new_tokens": max_new_tokens, "temperature": None,
            "top_p": None, "top_k": None, "pad_token_id": tokenizer.pad_token_id}


def strip_generated(ids: Sequence[int], eos_ids: set[int], pad_id: int | None) -> list[int]:
    """Generated ids up to (not including) the first EOS; trailing pads dropped."""
    out: list[int] = []
    for tok in ids:
        if tok in eos_ids:
            break
        out.append(tok)
    while out and pad_id is not None and out[-1] == pad_id and pad_id not in eos_ids:
        out.pop()
    return out


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _run_batch(model: Any, tokenizer: Any, sources: list[str], setting: Setting,
               config: TranslationConfig) -> dict[str, Any]:
    """One ``generate`` call; returns raw new-token rows, its max_new_tokens, seconds and setting stats."""
    src_len = max(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sources)
    max_new = max(config.min_new_tokens_cap, int(round(config.new_tokens_factor * src_len)))
    prompts = [build_prompt(tokenizer, s, config) for s in sources]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    extra = setting.generate_kwargs()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, **greedy_generation_kwargs(tokenizer, max_new), **extra)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rows = out[:, inputs["input_ids"].shape[1]:].tolist()  # one host read per batch, after generation
    return {"rows": rows, "max_new_tokens": max_new, "seconds": seconds, "stats": setting.collect(extra),
            "prompt_tokens": int(inputs["attention_mask"].sum())}


def translate(model: Any, tokenizer: Any, sources: Sequence[str], setting: Setting,
              config: TranslationConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Translate ``sources`` with ``setting``.

    Returns:
        ``{"hypotheses": [str], "tokens": [[int]], "generated_tokens", "seconds", "tokens_per_s",
        "batches": [{"max_new_tokens", "seconds", "stats"}], "config"}`` (lists in source order).
    """
    from tqdm.auto import tqdm

    config = config or TranslationConfig()
    prepare_tokenizer(tokenizer)
    eos, pad = _eos_ids(model, tokenizer), tokenizer.pad_token_id
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    tokens: list[list[int]] = [[] for _ in sources]
    batches = []
    bar = tqdm(total=len(sources), desc=f"translate [{setting.name}]", disable=not progress, unit="verse")
    for start in range(0, len(order), config.batch_size):
        idx = order[start:start + config.batch_size]
        result = _run_batch(model, tokenizer, [sources[i] for i in idx], setting, config)
        for i, row in zip(idx, result.pop("rows")):
            tokens[i] = strip_generated(row, eos, pad)
        batches.append(result)
        bar.update(len(idx))
    bar.close()
    hyps = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    seconds = sum(b["seconds"] for b in batches)
    generated = sum(len(t) for t in tokens)
    return {"hypotheses": hyps, "tokens": tokens, "generated_tokens": generated, "seconds": seconds,
            "tokens_per_s": generated / seconds if seconds else 0.0, "batches": batches,
            "config": asdict(config)}
