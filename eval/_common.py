"""What the scripts under eval/ share. Scripts import this module, never each other.

- ``environment(device, **extra)``: the environment card every result carries (card, versions, command, commit),
  built by ``hf_adaptive.evaluation.report.environment_info`` and read back by ``eval/index_results.py``.
- ``pyplot()``: matplotlib on the Agg backend.
- The KV benchmarks' shared parts (bench_kv, bench_kv_e2e, bench_static_switch, merge_bench_kv_e2e): random-init
  Llama shapes, a prefilled prompt, byte counting, grid arguments and the by-context plot.
- ``SERVING_TARGETS``: the goal the parallel serving bench checks the adaptive engine against.

A script imports it as ``import _common``: Python puts the script's own folder first on ``sys.path``. The package
comes from the installation (or ``PYTHONPATH`` on a lent machine), never from a path inserted here.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from hf_adaptive.compat import forward_cache_kwargs  # noqa: E402
from hf_adaptive.evaluation.report import environment_info, headless_pyplot  # noqa: E402
from hf_adaptive.parallel.comparison import Targets  # noqa: E402

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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
