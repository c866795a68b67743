"""KV bytes and decode tokens/s: AdaptiveKVCache at 16/8/4 bits vs DynamicCache and transformers' QuantizedCache.

One command, e.g. (GPU):
    python eval/bench_kv.py --random-shape llama-1b --contexts 1024,4096 --batch-sizes 1,4 --device cuda \
        --dtype bfloat16 --out eval/results/bench_kv_h100
CPU smoke size:
    python eval/bench_kv.py --contexts 256,1024 --new-tokens 16 --repeats 3 --out eval/results/bench_kv_cpu

Each (cache, context, batch): prefill a random prompt, then decode ``--new-tokens`` greedy steps; the decode time
(warm-up runs excluded, median of ``--repeats``) gives tokens/s; KV bytes are measured on the live tensors after
decoding. Writes bench_kv.json / .md / .png under ``--out``. The adaptive cache runs its eager reference path
(history dequantized every step); the fused kernel is not used here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import DynamicCache, QuantizedCache  # noqa: E402

from hf_adaptive.evaluation.report import environment_info, markdown_table, write_report  # noqa: E402
from hf_adaptive.kv.cache import AdaptiveKVCache  # noqa: E402
from hf_adaptive.kv.quality import forward_cache_kwargs  # noqa: E402
from hf_adaptive.kv.static import AdaptiveStaticKVCache  # noqa: E402

CACHES = ("dynamic", "adaptive16", "adaptive8", "adaptive4", "quanto4", "hqq4")
RANDOM_SHAPES = {"llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                  num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256)}


def load(args):
    """(model, description) from --model or --random-shape."""
    dtype = getattr(torch, args.dtype)
    if args.random_shape:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(**RANDOM_SHAPES[args.random_shape], max_position_embeddings=131072)
        with torch.device(args.device):
            model = LlamaForCausalLM(config).to(dtype).eval()
        return model, f"random-init {args.random_shape}"
    from hf_adaptive.models import load_model

    model, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    return model.eval(), args.model or "smollm2-135m-instruct (embedded)"


def make_cache(name: str, model, args):
    """A fresh cache of kind ``name`` (raises ImportError/ValueError when a backend is unavailable)."""
    if name == "dynamic":
        return DynamicCache(config=model.config)
    if name.startswith("adaptive"):
        bits = int(name[len("adaptive"):])
        return AdaptiveKVCache(model.config, fixed_bits=None if bits == 16 else bits, backend=args.backend,
                               residual_length=args.residual_length, block_size=args.block_size)
    backend, nbits = name[:-1], int(name[-1])
    return QuantizedCache(backend=backend, config=model.config, nbits=nbits, q_group_size=64,
                          residual_length=args.residual_length)


def tensor_bytes(obj, seen: set | None = None) -> int:
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


def kv_bytes(cache) -> int:
    if isinstance(cache, AdaptiveStaticKVCache):  # preallocated: count what it reserved
        return cache.stats()["reserved_bytes"]
    if isinstance(cache, AdaptiveKVCache):
        return cache.live_bytes()
    return sum(tensor_bytes(layer) for layer in cache.layers)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def run_once(model, name: str, context: int, batch: int, args) -> dict:
    """Prefill + decode once; returns timings (s) and KV bytes."""
    cache = make_cache(name, model, args)
    g = torch.Generator().manual_seed(context + batch)
    ids = torch.randint(10, model.config.vocab_size, (batch, context), generator=g).to(args.device)
    sync(args.device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, **forward_cache_kwargs(model, cache))
    sync(args.device)
    t1 = time.perf_counter()
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(args.new_tokens):
        out = model(input_ids=token, use_cache=True, **forward_cache_kwargs(model, cache))
        token = out.logits[:, -1:].argmax(-1)
    sync(args.device)
    t2 = time.perf_counter()
    tokens = context + args.new_tokens
    bf16 = sum(2 * batch * tokens * (model.config.num_key_value_heads * _head_dim(model.config)) * 2
               for _ in range(model.config.num_hidden_layers))
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "kv_bytes": kv_bytes(cache), "bf16_bytes": bf16}


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def bench(model, args) -> list[dict]:
    rows = []
    grid = [(c, n, b) for n in args.contexts for b in args.batch_sizes for c in args.caches]
    for name, context, batch in tqdm(grid, desc="bench_kv"):
        row = {"cache": name, "context": context, "batch": batch}
        try:
            for _ in range(args.warmup):
                run_once(model, name, context, batch, args)
            runs = [run_once(model, name, context, batch, args) for _ in range(args.repeats)]
        except (ImportError, ValueError, RuntimeError) as err:  # backend missing on this machine
            rows.append({**row, "skipped": f"{type(err).__name__}: {str(err)[:160]}"})
            continue
        decode = statistics.median(r["decode_s"] for r in runs)
        row.update(decode_tok_s=batch * args.new_tokens / decode, decode_ms_per_step=1000 * decode / args.new_tokens,
                   prefill_ms=1000 * statistics.median(r["prefill_s"] for r in runs),
                   kv_mib=runs[-1]["kv_bytes"] / 2**20, ratio_vs_bf16=runs[-1]["kv_bytes"] / runs[-1]["bf16_bytes"])
        rows.append(row)
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="embedded model name or local checkpoint (default SmolLM2)")
    src.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES), default=None)
    p.add_argument("--contexts", default="256,1024", help="comma-separated prompt lengths")
    p.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--caches", default=",".join(CACHES), help=f"subset of {CACHES}")
    p.add_argument("--backend", default="torch", choices=("torch", "hqq"), help="AdaptiveKVCache quantizer")
    p.add_argument("--residual-length", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--out", default="eval/results/bench_kv")
    return parse_grid_args(p, argv, CACHES)


def parse_grid_args(p: argparse.ArgumentParser, argv, caches: tuple[str, ...]) -> argparse.Namespace:
    """Parse, then split the comma lists ``--contexts``, ``--batch-sizes``, ``--caches`` (checked against ``caches``)."""
    args = p.parse_args(argv)
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    args.caches = [c for c in args.caches.split(",") if c]
    bad = [c for c in args.caches if c not in caches]
    if bad:
        p.error(f"--caches: unknown {bad}; choose from {caches}")
    return args


def plot_lines(path: Path, rows: list[dict], title: str) -> None:
    """ms per decode step and KV MiB against context, one line per cache, one column per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(6 * len(batches), 8), squeeze=False)
    for col, batch in enumerate(batches):
        for cache in dict.fromkeys(r["cache"] for r in rows):
            pts = sorted((r["context"], r["decode_ms_per_step"], r["kv_mib"]) for r in rows
                         if r["cache"] == cache and r["batch"] == batch)
            if pts:
                ctx, ms, mib = zip(*pts)
                axes[0][col].plot(ctx, ms, marker="o", label=cache)
                axes[1][col].plot(ctx, mib, marker="o", label=cache)
        axes[0][col].set_title(f"batch {batch}: ms per decode step")
        axes[1][col].set_title(f"batch {batch}: KV MiB (scales/zeros included)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.grid(alpha=0.3)
        axes[1][col].set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    model, description = load(args)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    rows = bench(model, args)
    env = {**environment_info(args.device, card), "model": description, "dtype": args.dtype,
           "new_tokens": args.new_tokens, "repeats": args.repeats, "warmup": args.warmup,
           "load_average_1m_at_end": os.getloadavg()[0]}
    done = [r for r in rows if "skipped" not in r]
    columns = ["cache", "context", "batch", "decode_tok_s", "decode_ms_per_step", "prefill_ms", "kv_mib",
               "ratio_vs_bf16", "skipped"]
    notes = ("decode_tok_s: batch * new_tokens / median decode time (warm-up excluded). kv_mib: live KV tensors "
             "after decoding (scales/zeros included). adaptive* use the eager reference path, which dequantizes "
             "the whole history every step; the fused attention kernel is what removes that cost.")
    paths = write_report(args.out, "bench_kv", {"rows": rows, "args": vars(args)}, env,
                         markdown_table(rows, columns), f"KV cache bench: {description} on {card}", notes)
    if done:
        plot_lines(Path(args.out) / "bench_kv.png", done, f"{description}, {card}")
    print(markdown_table(rows, columns))
    print("wrote", {k: str(v) for k, v in paths.items()})


if __name__ == "__main__":
    main()
