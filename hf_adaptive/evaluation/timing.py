"""Decode speed of one setting: tokens/s, time to first token, per-token latency, peak memory.

Contract: ``measure_speed(model, input_ids, setting, config)`` runs ``generate`` with exactly
``new_tokens`` new tokens (EOS ignored) ``warmup`` times unmeasured, then ``repeats`` times measured, and
returns medians over the repeats. Step times come from a ``LogitsProcessor`` that timestamps every decode
step (synchronizing the GPU first on CUDA, so each stamp marks finished work). Runs on CPU and CUDA.

Definitions: TTFT = start of ``generate`` -> logits of the first new token (prefill); per-token
latency = time between consecutive steps; decode tokens/s = batch x (steps - 1) / (last - first stamp).
Peak memory: ``torch.cuda.max_memory_allocated`` per run on CUDA; on CPU the process's peak RSS (a lifetime
maximum, so it only grows across settings).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from hf_adaptive.evaluation.settings import Setting


@dataclass(frozen=True)
class SpeedConfig:
    """Workload of one speed measurement (recorded with the results)."""

    batch_size: int = 1
    prompt_tokens: int = 256
    new_tokens: int = 128
    warmup: int = 1
    repeats: int = 3

    def __post_init__(self) -> None:
        for name in ("batch_size", "prompt_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}. Fix: e.g. {name}=1.")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens must be >= 2 (one decode interval); got {self.new_tokens}. "
                             "Fix: e.g. new_tokens=128.")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0; got {self.warmup}. Fix: warmup=1.")


class StepTimer(LogitsProcessor):
    """Stamps ``time.perf_counter()`` at every generation step; never changes the scores."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.sync:
            torch.cuda.synchronize()  # a benchmark-only sync: the stamp must mark finished GPU work
        self.stamps.append(time.perf_counter())
        return scores


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated ``q``-quantile (q in [0, 1]) of a non-empty list."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize_run(start: float, stamps: list[float], batch_size: int) -> dict[str, float]:
    """TTFT, decode tokens/s and p50/p99 per-token latency (ms) of one run from its step stamps."""
    if len(stamps) < 2:
        raise ValueError(f"stamps: need >= 2 step stamps for a decode interval, got {len(stamps)}; "
                         "generate at least 2 new tokens.")
    gaps_ms = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    decode_s = stamps[-1] - stamps[0]
    return {"ttft_ms": (stamps[0] - start) * 1e3,
            "decode_tokens_per_s": batch_size * len(gaps_ms) / decode_s if decode_s > 0 else float("inf"),
            "p50_token_ms": percentile(gaps_ms, 0.5), "p99_token_ms": percentile(gaps_ms, 0.99),
            "total_s": stamps[-1] - start}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA bytes since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def _one_run(model: Any, input_ids: torch.Tensor, setting: Setting, config: SpeedConfig) -> dict[str, Any]:
    timer = StepTimer(model.device)
    extra = setting.generate_kwargs()
    processors = LogitsProcessorList([*extra.pop("logits_processor", []), timer])
    kwargs = {"do_sample": False, "max_new_tokens": config.new_tokens, "min_new_tokens": config.new_tokens,
              "pad_token_id": 0, "temperature": None, "top_p": None, "top_k": None}
    mask = torch.ones_like(input_ids)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=input_ids, attention_mask=mask, logits_processor=processors,
                       **kwargs, **extra)
    run = summarize_run(start, timer.stamps, input_ids.shape[0])
    run["peak_memory_bytes"] = peak_memory_bytes(model.device)
    extra["logits_processor"] = [p for p in processors if p is not timer]
    run["stats"] = setting.collect(extra)
    return run


def _aggregate(setting: Setting, runs: list[dict[str, Any]], config: SpeedConfig) -> dict[str, Any]:
    keys = ("ttft_ms", "decode_tokens_per_s", "p50_token_ms", "p99_token_ms", "total_s")
    result = {k: statistics.median(r[k] for r in runs) for k in keys}
    return {"setting": setting.name, "kind": setting.kind, "params": setting.params, **result,
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs), "runs": runs,
            "config": asdict(config)}


def measure_interleaved(model: Any, input_ids: torch.Tensor, settings: list[Setting],
                        config: SpeedConfig) -> list[dict[str, Any]]:
    """Median speed of each setting on ``input_ids`` (B, T), repeats interleaved round-robin.

    Interleaving (warm-up all, then repeat: each setting once) spreads load or clock drift over all
    settings instead of charging it to whichever ran last.

    Returns:
        per setting ``{"setting", "kind", "params", "ttft_ms", "decode_tokens_per_s", "p50_token_ms",
        "p99_token_ms", "total_s", "peak_memory_bytes", "runs", "config"}`` (scalars are medians; peak
        memory is the max over runs).
    """
    for _ in range(config.warmup):
        for setting in settings:
            _one_run(model, input_ids, setting, config)
    runs: list[list[dict[str, Any]]] = [[] for _ in settings]
    for _ in range(config.repeats):
        for i, setting in enumerate(settings):
            runs[i].append(_one_run(model, input_ids, setting, config))
    return [_aggregate(setting, r, config) for setting, r in zip(settings, runs)]


def measure_speed(model: Any, input_ids: torch.Tensor, setting: Setting,
                  config: SpeedConfig) -> dict[str, Any]:
    """Median speed of one ``setting`` (see :func:`measure_interleaved`)."""
    return measure_interleaved(model, input_ids, [setting], config)[0]


def real_text_prompt(tokenizer: Any, text: str, prompt_tokens: int, batch_size: int) -> torch.Tensor:
    """(batch_size, prompt_tokens) ids of real text, repeating the text if it is too short."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() == 0:
        raise ValueError("text: tokenizes to nothing; pass real text (e.g. hf_adaptive/evaluation/corpus/english_ppl.txt).")
    reps = -(-prompt_tokens // ids.numel())
    row = ids.repeat(reps)[:prompt_tokens]
    return row.unsqueeze(0).repeat(batch_size, 1)
