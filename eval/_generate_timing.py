"""Timing through plain ``model.generate``, shared by the generate-level benchmarks (KV caches, precision tiers).

decode ms/token = (t(N new tokens) - t(1 new token)) / (N - 1), each t the median wall time of a few calls
synchronized before and after: the prefill cancels out and every decode step's host and device work is in.

The prefill cancels only on average: at long context it is most of a call (about 1 s at 64k tokens against ~0.1 s of
33 decode steps), so a few per cent of prefill jitter moves that estimate by a millisecond per token. The N-token
calls therefore also carry a streamer (:class:`StepClock`, the hook any streaming user passes) that stamps when
``generate`` hands out each new token: ``decode_ms_streamed`` = (stamp of token N - stamp of token 1) / (N - 1), decode
steps only. ``generate`` copies each token to the host for a streamer; it already synchronizes every step to test for
finished sequences, so the copy adds a few microseconds per step to the calls (and to both estimates).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from _common import sync  # first: sets the offline default

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

import hf_adaptive  # noqa: E402
from hf_adaptive.compat import generate_cache_kwargs  # noqa: E402
from hf_adaptive.overlap import defer_stop_checks  # noqa: E402

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, intermediate_size=8192, vocab_size=128256),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, intermediate_size=14336, vocab_size=128256),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=256, vocab_size=512),
}


class CaptureCounter:
    """Counts CUDA graph captures (``torch.cuda.graph`` entries, which cudagraph trees use) and dynamo graphs."""

    def __init__(self) -> None:
        self.captures = 0
        original = torch.cuda.graph.__enter__

        def counting_enter(graph_self, *a, **k):
            self.captures += 1
            return original(graph_self, *a, **k)

        torch.cuda.graph.__enter__ = counting_enter

    @staticmethod
    def dynamo_graphs() -> int:
        return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


class StepClock(BaseStreamer):
    """A ``generate`` streamer that only notes the host time at which each batch of tokens is handed to it (the
    prompt first, then one put per new token), touching no tensor."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_ms_per_token(self) -> float | None:
        """ms between the first and the last new token, per step; None with fewer than two new tokens."""
        new = self.stamps[1:]  # stamps[0]: the prompt, put before the prefill runs
        return 1000 * (new[-1] - new[0]) / (len(new) - 1) if len(new) >= 2 else None


def build_model(shape: str, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """Random-init Llama of ``shape`` (seeded), eval mode, on ``device`` in ``dtype``."""
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=131072)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random weights: never stop early
    hf_adaptive.register_attention()
    return model


def prompt(vocab: int, batch: int, tokens: int, seed: int, device: str) -> torch.Tensor:
    """(batch, tokens) random token ids in [10, vocab), seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, tokens), generator=g).to(device)


def stop_check_variant(cache, name: str):
    """``cache`` as the cache name asks for generate's stop check: ``..._deferred`` opts it into overlapped decoding
    (``hf_adaptive.overlap``), ``..._per_step`` opts it out (the flag read every step); any other name keeps what
    the cache's class does. Returns the cache."""
    if name.endswith("_deferred"):
        defer_stop_checks(cache)
    elif name.endswith("_per_step"):
        defer_stop_checks(cache, False)
    return cache


def generate_once(model, ids: torch.Tensor, cache, new_tokens: int, device: str, **generate_kwargs) -> dict:
    """One plain greedy generate call (synchronized around it); returns its wall time and the new tokens.
    ``generate_kwargs`` go to ``generate`` as they are (e.g. ``logits_processor=[controller]``)."""
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, **generate_cache_kwargs(cache),
                         **generate_kwargs)
    sync(device)
    return {"wall_s": time.perf_counter() - t0, "tokens": out[:, ids.shape[1]:].cpu()}


def profile_call(model, ids: torch.Tensor, cache, new_tokens: int, device: str, stem: Path,
                 **generate_kwargs) -> dict:
    """torch.profiler over one generate call: device time, kernel launches and CUDA-graph launches per decoded token;
    the top ops by host and by device time to ``stem``.cpu.txt / .cuda.txt. ``generate_kwargs`` go to generate."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        generate_once(model, ids, cache, new_tokens, device, **generate_kwargs)
    events = prof.key_averages()
    dev_attr = "self_device_time_total"
    gpu_us = sum(getattr(e, dev_attr, 0) for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    graph_launches = sum(e.count for e in events if e.key == "cudaGraphLaunch")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".cpu.txt").write_text(events.table(sort_by="self_cpu_time_total", row_limit=40,
                                                         max_name_column_width=80))
    if device.startswith("cuda"):
        stem.with_suffix(".cuda.txt").write_text(events.table(sort_by=dev_attr, row_limit=30, max_name_column_width=80))
    return {"gpu_ms_per_token": gpu_us / 1000 / new_tokens, "kernel_launches_per_token": launches / new_tokens,
            "graph_launches_per_token": graph_launches / new_tokens}


def host_profile_call(model, ids: torch.Tensor, cache, new_tokens: int, device: str, stem: Path,
                      **generate_kwargs) -> dict:
    """cProfile over one generate call: where the host's time per decoded token goes, by Python function (the
    C++ parts, e.g. dynamo's guards or a CUDA graph launch, inside the function that calls them), to
    ``stem``.host.txt."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    generate_once(model, ids, cache, new_tokens, device, **generate_kwargs)
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text).strip_dirs()  # no machine paths in the result
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(45)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".host.txt").write_text(text.getvalue())
    return {"host_ms_per_token": stats.total_tt * 1000 / new_tokens,
            "python_calls_per_token": stats.total_calls / new_tokens}


def timed_calls(model, ids, cache_for_call, new_tokens: int, repeats: int, device: str,
                before_call=None, **generate_kwargs) -> dict:
    """Median wall time of ``repeats`` calls of 1 and of ``new_tokens`` new tokens; decode ms/token from both, and
    from the N-token calls' token stamps alone (:class:`StepClock`, see the module's docstring).
    ``before_call()`` runs before each call, outside the timing (e.g. a controller's reset)."""
    one, many, streamed = [], [], []
    for _ in range(repeats):
        for n, into in ((1, one), (new_tokens, many)):
            if before_call is not None:
                before_call()
            clock = StepClock() if n > 1 else None
            kwargs = {**generate_kwargs, "streamer": clock} if clock is not None else generate_kwargs
            into.append(generate_once(model, ids, cache_for_call(), n, device, **kwargs)["wall_s"])
            if clock is not None and clock.decode_ms_per_token() is not None:
                streamed.append(round(clock.decode_ms_per_token(), 4))
    t1, tn = statistics.median(one), statistics.median(many)
    out = {"decode_ms_per_token": 1000 * (tn - t1) / (new_tokens - 1), "prefill_s": t1,
           "ms_runs": [round(1000 * (n - o) / (new_tokens - 1), 4) for o, n in zip(one, many)]}
    if streamed:
        out.update(decode_ms_streamed=statistics.median(streamed), ms_runs_streamed=streamed)
    return out


def add_run_arguments(p: argparse.ArgumentParser, default_out: str, stem: str) -> None:
    """``--device``, ``--dtype``, ``--name`` and ``--out``, as every generate-level benchmark takes them."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--name", default=None, help=f"file stem of the result (default {stem}_SHAPE)")
    p.add_argument("--out", default=default_out)


def choice_list(p: argparse.ArgumentParser, text: str, choices: tuple[str, ...], flag: str) -> list[str]:
    """A comma-separated subset of ``choices`` (``p.error`` naming ``flag`` otherwise)."""
    out = [c for c in text.split(",") if c]
    bad = sorted(set(out) - set(choices))
    if bad:
        p.error(f"{flag}: unknown {bad}; choose from {choices}")
    return out


def prepare_run(device: str) -> str:
    """Room for every compiled configuration of a run in dynamo's cache; returns the card's name."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"


def int_list(text: str) -> list[int]:
    """``"64,1024"`` -> ``[64, 1024]`` (an argparse ``type=``)."""
    return [int(x) for x in text.split(",") if x.strip()]
