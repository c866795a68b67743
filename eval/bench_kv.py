"""KV bytes and decode tokens/s: AdaptiveKVCache at 16/8/4 bits vs DynamicCache and transformers' QuantizedCache.

One command, e.g. (GPU):
    python eval/bench_kv.py --random-shape llama-1b --contexts 1024,4096 --batch-sizes 1,4 --device cuda \
        --dtype bfloat16 --out results/bench_kv   (eval/gpu/run.sh kv storage writes eval/results/kv_storage_CARD)
CPU smoke size:
    python eval/bench_kv.py --contexts 256,1024 --new-tokens 16 --repeats 3 --out results/bench_kv_cpu

Each (cache, context, batch): prefill a random prompt, then decode ``--new-tokens`` greedy steps; the decode time
(warm-up runs excluded, median of ``--repeats``) gives tokens/s; KV bytes are measured on the live tensors after
decoding. Writes bench_kv.json / .md / .png under ``--out``. The adaptive cache runs its eager reference path
(history dequantized every step); the fused kernel is not used here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from _common import SHAPES, environment, kv_bytes, parse_grid_args, plot_by_context, random_llama, sync  # first: offline
import torch
from tqdm import tqdm
from transformers import DynamicCache, QuantizedCache

from hf_adaptive.compat import forward_cache_kwargs
from hf_adaptive.evaluation.report import markdown_table, write_report
from hf_adaptive.kv.cache import AdaptiveKVCache

CACHES = ("dynamic", "adaptive16", "adaptive8", "adaptive4", "quanto4", "hqq4")


def load(args):
    """(model, description) from --model or --random-shape."""
    if args.random_shape:
        return random_llama(args.random_shape, args.device, args.dtype), f"random-init {args.random_shape}"
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
    src.add_argument("--random-shape", choices=sorted(SHAPES), default=None)
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
    p.add_argument("--out", default="results/bench_kv")
    return parse_grid_args(p, argv, CACHES)


def plot_lines(path: Path, rows: list[dict], title: str) -> None:
    """ms per decode step and KV MiB against context, one line per cache, one column per batch size."""
    plot_by_context(path, rows, title, [("decode_ms_per_step", "ms per decode step", False),
                                        ("kv_mib", "KV MiB (scales/zeros included)", True)])


def main(argv=None) -> None:
    args = parse_args(argv)
    model, description = load(args)
    rows = bench(model, args)
    env = environment(args.device, model=description, dtype=args.dtype, new_tokens=args.new_tokens,
                      repeats=args.repeats, warmup=args.warmup, load_average_1m_at_end=os.getloadavg()[0])
    card = env["card"]
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
