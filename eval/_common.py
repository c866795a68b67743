"""What the scripts under eval/ share. Scripts import this module, never each other.

- ``environment(device, **extra)``: the environment card every result carries (card, versions, command, commit),
  built by ``hf_adaptive.evaluation.report.environment_info`` and read back by ``eval/index_results.py``.
- ``pyplot()``: matplotlib on the Agg backend; ``save_figure``: lay out, write and free a figure.
- The KV benchmarks' shared parts (bench_kv, bench_kv_e2e, bench_static_switch, merge_bench_kv_e2e): random-init
  Llama shapes, a prefilled prompt, byte counting, grid arguments and the by-context plot.
- GPU timing: ``time_op`` (median µs of CUDA-graph replays) and ``copy_bandwidth_bytes_per_us`` (the byte floor).
- Precision schedules recorded on CPU for GPU replay (record_chat_schedule, record_translate_schedule): the
  policies, the verified-mode recorder and the JSON layout ``bench_precision.py --schedule`` reads.
- ``SERVING_TARGETS``: the goal the parallel serving bench checks the adaptive engine against.

A script imports it as ``import _common``: Python puts the script's own folder first on ``sys.path``. The package
comes from the installation (or ``PYTHONPATH`` on a lent machine), never from a path inserted here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from hf_adaptive.compat import forward_cache_kwargs  # noqa: E402
from hf_adaptive.evaluation.report import environment_info, headless_pyplot, save_figure  # noqa: E402
from hf_adaptive.parallel.comparison import Targets  # noqa: E402

logger = logging.getLogger(__name__)

# The serving goal: adaptive at >= 1.25x the best static plan's throughput and <= 0.8x its p99 latency.
SERVING_TARGETS = Targets(min_speedup=1.25, max_p99_ratio=0.8)

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                intermediate_size=8192, vocab_size=128256)
SHAPES = {  # random-init Llama shapes: decode speed depends on shapes, not on weight values
    "llama-3.2-1b": LLAMA_1B,
    "llama-1b": LLAMA_1B,  # the name bench_kv's recorded commands use
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=256, vocab_size=512),
}


E2E_SERIES = [("ms_per_token", "ms / decoded token", True), ("kv_gib", "KV GiB", False)]  # bench_kv_e2e's plot


def environment(device: str, **extra: Any) -> dict[str, Any]:
    """The environment card of a result on ``device`` ("cuda", "cpu", ...), with ``extra`` fields appended."""
    return {**environment_info(device), **extra}


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend."""
    return headless_pyplot()


def random_llama(shape: str, device: str, dtype: str) -> Any:
    """A random-init Llama of ``shape`` (seed 0) on ``device`` in ``dtype``, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=131072)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def prefill(model: Any, context: int, batch: int, device: str) -> tuple[list, torch.Tensor]:
    """Per-layer (keys, values) of a random prompt (B, context) and the first greedy token (B, 1)."""
    from transformers import DynamicCache

    model.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(context + batch)
    ids = torch.randint(10, model.config.vocab_size, (batch, context), generator=g).to(device)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **forward_cache_kwargs(model, cache))
    states = [(layer.keys, layer.values) for layer in cache.layers]
    return states, out.logits[:, -1:].argmax(-1)


def sync(device: str) -> None:
    """Wait for the GPU, so a wall-clock stamp marks finished work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tensor_bytes(obj: Any, seen: set | None = None) -> int:
    """Bytes of every tensor reachable from ``obj`` (tensor subclasses via their inner tensors)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        return sum(tensor_bytes(v, seen) for k, v in vars(obj).items() if k != "context")
    return 0


def kv_bytes(cache: Any) -> int:
    """What a cache holds: the reservation of a static cache, the live bytes of ours, the tensors of any other."""
    from hf_adaptive.kv.cache import AdaptiveKVCache
    from hf_adaptive.kv.static import AdaptiveStaticKVCache

    if isinstance(cache, AdaptiveStaticKVCache):  # preallocated: count what it reserved
        return cache.stats()["reserved_bytes"]
    if isinstance(cache, AdaptiveKVCache):
        return cache.live_bytes()
    return sum(tensor_bytes(layer) for layer in cache.layers)


def parse_grid_args(p: argparse.ArgumentParser, argv: Sequence[str] | None,
                    caches: tuple[str, ...]) -> argparse.Namespace:
    """Parse, then split the comma lists ``--contexts``, ``--batch-sizes``, ``--caches`` (checked against ``caches``)."""
    args = p.parse_args(argv)
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    args.caches = [c for c in args.caches.split(",") if c]
    bad = [c for c in args.caches if c not in caches]
    if bad:
        p.error(f"--caches: unknown {bad}; choose from {caches}")
    return args


def plot_by_context(path: Path, rows: list[dict], title: str, series: Sequence[tuple[str, str, bool]]) -> None:
    """One line per cache against context (log2 x), one column per batch size, one row per ``series`` entry.

    ``series``: ``(row key, axis label, log y)``, e.g. ``("ms_per_token", "ms / decoded token", True)``.
    Rows with a ``skipped`` reason are left out.
    """
    done = [r for r in rows if "skipped" not in r]
    batches = sorted({r["batch"] for r in done})
    if not batches:
        return
    plt = pyplot()
    fig, axes = plt.subplots(len(series), len(batches), figsize=(6 * len(batches), 4 * len(series)), squeeze=False)
    for col, batch in enumerate(batches):
        for cache in dict.fromkeys(r["cache"] for r in done):
            pts = sorted((r["context"], *(r[key] for key, _, _ in series)) for r in done
                         if r["cache"] == cache and r["batch"] == batch)
            for row in range(len(series)):
                if pts:
                    axes[row][col].plot([p[0] for p in pts], [p[row + 1] for p in pts], marker="o", label=cache)
        for row, (_, label, log_y) in enumerate(series):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            if log_y:
                ax.set_yscale("log")
            ax.set_xlabel("context tokens")
            ax.set_ylabel(label)
            ax.set_title(f"batch {batch}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def time_op(fn, inner: int, reps: int) -> float:
    """Median microseconds of ``fn()``: CUDA-graph replays of ``inner`` calls, or do_bench if capture fails."""
    fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fn()  # warm up on the capture stream (allocator pools)
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(inner):
                    fn()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - any capture failure falls back to event timing
        logger.warning("CUDA graph capture failed (%s); timing with triton.testing.do_bench", exc)
        import triton

        return triton.testing.do_bench(fn, return_mode="median") * 1e3
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    return statistics.median(times)


def copy_bandwidth_bytes_per_us() -> float:
    """Device-to-device copy bandwidth (read + write bytes per microsecond) on a 1 GiB buffer."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_op(lambda: dst.copy_(src), inner=5, reps=10)
    return 2 * src.numel() / us


def schedule_policies() -> tuple[Any, Any]:
    """(confidence-adaptive, always-draft) policies of the CPU recordings: int4 (g=64) draft, fp32 top tier."""
    from hf_adaptive.policy.precision_policy import PrecisionPolicyConfig

    adaptive = PrecisionPolicyConfig(fast_tier="int4", mid_tier="fp32", top_tier="fp32")
    # "always": draft max_draft tokens every round, to compare with confidence-adaptive drafts
    always = PrecisionPolicyConfig(fast_tier="int4", mid_tier="fp32", top_tier="fp32", high=0.0, low=0.0)
    return adaptive, always


def policy_bands(scores: Sequence[float], policy: Any) -> list[str]:
    """The band (fast / mid / top) the policy puts each confidence score in."""
    return ["fast" if s > policy.high else "mid" if s >= policy.low else "top" for s in scores]


def record_verified(tiers: Any, ids: torch.Tensor, n: int, policy: Any, max_draft: int) -> dict:
    """Verified-mode rounds ``[drafted, accepted]`` (and the telemetry report) of ``n`` new tokens after ``ids``."""
    from hf_adaptive.precision.graph_decode import GraphDecodeConfig, GraphDecodeEngine
    from hf_adaptive.precision.options import DecodeOptions, DraftOptions
    from hf_adaptive.precision.verified import generate_verified

    engine = GraphDecodeEngine(tiers, GraphDecodeConfig(max_len=ids.shape[1] + n + max_draft + 8,
                                                        verify_len=max_draft + 1))
    draft = DraftOptions(max_draft=max_draft, policy=policy)
    opts = DecodeOptions(max_new_tokens=n, draft=draft)
    generate_verified(engine, ids, opts)
    return {"rounds": [list(r) for r in draft.history], "report": draft.telemetry.report()}


def write_schedule(path: str | Path, model: str, records: list[dict], policy: Any, max_draft: int,
                   **extra: Any) -> None:
    """Write a recorded schedule: the CPU environment card, the tiers and policy, then ``records``."""
    out = {**environment("cpu"), "model": model, "tiers": ["int4", "fp32"],
           "policy": {"high": policy.high, "low": policy.low}, "max_draft": max_draft, **extra, "records": records}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))
