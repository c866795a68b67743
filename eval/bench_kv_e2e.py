"""End-to-end decode ms/token and KV GiB: DynamicCache, compiled StaticCache, QuantizedCache and AdaptiveKVCache
(eager dequantize path vs the fused packed-KV attention kernel).

One command (GPU, default flags finish in < 6 minutes on one H100):
    python eval/bench_kv_e2e.py --out results/bench_kv_e2e   (eval/gpu/run.sh kv e2e-* runs the committed grid)
CPU smoke size:
    python eval/bench_kv_e2e.py --device cpu --dtype float32 --shape tiny --contexts 128,256 --batch-sizes 1,2 \
        --new-tokens 4 --out /tmp/bench_kv_e2e_cpu

Per (context, batch): ONE model prefill (sdpa, DynamicCache, logits of the last position only) gives every layer's
keys/values; each cache is then filled with exactly those states through its own ``update()`` (what a prefill
forward would store) and decodes greedily: ``--warmup`` steps (excluded; they also compile StaticCache's decode),
then ``--repeats`` timed runs of ``--new-tokens`` steps; ms/token is the median over runs. KV bytes are the live
cache tensors after decoding. Caches:
- dynamic: DynamicCache, sdpa.
- static_compiled: StaticCache + transformers' own compiled decode (``model.get_compiled_call``), per shape.
- quanto4: transformers QuantizedCache, quanto 4-bit (skipped when optimum-quanto is not importable).
- adaptive16/8/4: AdaptiveKVCache fixed bits, eager path (history dequantized every step), sdpa.
- fused8/fused4: AdaptiveKVCache fixed bits, ``attn_implementation="hf_adaptive"`` (Triton kernel on CUDA).
- compiled16/8/4: AdaptiveStaticKVCache (fixed bits) under ``model.get_compiled_call`` like static_compiled: the
  compile-friendly variant, fused kernel through a custom op, host step in eager hooks around the graph.
- hqq4: transformers QuantizedCache, hqq 4-bit (skipped when hqq is not importable).
cuDNN SDPA: off for every eager cache (it builds an execution plan per new key length, so each eager step at a
new length paid it); ``--static-cudnn on`` (default) turns it on around static_compiled only, whose key length is
fixed (its fastest backend on an H100): StaticCache is compared at its best. ``--profile-steps N`` also profiles N
steps of every compiled config (torch.profiler, CUDA kernels): ``gpu_ms_per_token`` (kernel time; against the wall
ms/token it tells host-bound from kernel-bound) and the top kernels, in ``profiles/``.
A config past ``--time-budget-s`` (whole grid) or ``--compile-budget-s`` (time in static_compiled, which compiles
per shape), or out of memory, is recorded as skipped with the reason, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import (E2E_SERIES, SHAPES, environment, kv_bytes, parse_grid_args,  # first: offline default
                     plot_by_context, prefill, random_llama, sync)
import torch
from tqdm import tqdm
from transformers import DynamicCache, StaticCache

import hf_adaptive
from hf_adaptive.compat import forward_cache_kwargs
from hf_adaptive.evaluation.report import markdown_table, write_report
from hf_adaptive.kv.cache import AdaptiveKVCache
from hf_adaptive.kv.static import AdaptiveStaticKVCache

CACHES = ("dynamic", "quanto4", "hqq4", "adaptive16", "adaptive8", "adaptive4", "fused8", "fused4", "static_compiled",
          "compiled16", "compiled8", "compiled4")
def build_model(args):
    """Random-init Llama of ``--shape`` on ``--device`` in ``--dtype``, with our attention registered."""
    model = random_llama(args.shape, args.device, args.dtype)
    hf_adaptive.register_attention()
    return model


def make_cache(name: str, model, max_len: int, args):
    """A fresh cache of kind ``name``; raises ImportError when its backend is missing."""
    if name == "dynamic":
        return DynamicCache(config=model.config)
    if name == "static_compiled":
        return StaticCache(config=model.config, max_cache_len=max_len)
    if name in ("quanto4", "hqq4"):
        from transformers import QuantizedCache

        backend = name.removesuffix("4")
        __import__("optimum.quanto" if backend == "quanto" else "hqq")  # ImportError -> recorded as skipped
        return QuantizedCache(backend=backend, config=model.config, nbits=4, q_group_size=64,
                              residual_length=args.residual_length)
    if name.startswith("compiled"):
        bits = int(name.removeprefix("compiled"))
        return AdaptiveStaticKVCache(model.config, max_cache_len=max_len, fixed_bits=None if bits == 16 else bits,
                                     residual_length=args.residual_length, block_size=args.block_size)
    bits = int(name.removeprefix("adaptive").removeprefix("fused"))
    return AdaptiveKVCache(model.config, fixed_bits=None if bits == 16 else bits, residual_length=args.residual_length,
                           block_size=args.block_size, packed_attention=name.startswith("fused"))


@torch.no_grad()
def decode_one(model, name: str, states: list, token: torch.Tensor, args) -> dict:
    """Fill cache ``name`` with the prefill states, decode; returns ms/token per timed run and KV bytes."""
    steps = args.warmup + args.repeats * args.new_tokens + (args.profile_steps if _compiled(name) else 0)
    cache = make_cache(name, model, states[0][0].shape[-2] + steps + 1, args)
    for i, (k, v) in enumerate(states):
        cache.update(k, v, i)
    if name.startswith(("fused", "compiled")):
        hf_adaptive.enable_fused_attention(model)  # also the step hooks the compiled adaptive cache needs
    else:
        model.set_attn_implementation("sdpa")
    step = model.get_compiled_call(None) if name == "static_compiled" or name.startswith("compiled") else model
    kwargs = forward_cache_kwargs(model, cache)

    def run(n: int, token: torch.Tensor) -> torch.Tensor:
        for _ in range(n):
            token = step(input_ids=token, use_cache=True, **kwargs).logits[:, -1:].argmax(-1)
        return token

    cudnn = args.static_cudnn == "on" and name == "static_compiled" and args.device.startswith("cuda")
    if cudnn:
        torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        return _timed_decode(run, token, cache, name, args)
    finally:
        if cudnn:
            torch.backends.cuda.enable_cudnn_sdp(False)


def _timed_decode(run, token: torch.Tensor, cache, name: str, args) -> dict:
    """Warm-up, timed runs and (compiled configs, ``--profile-steps``) a kernel profile of ``run``."""
    token = run(args.warmup, token)
    ms = []
    for _ in range(args.repeats):
        sync(args.device)
        t0 = time.perf_counter()
        token = run(args.new_tokens, token)
        sync(args.device)
        ms.append(1000 * (time.perf_counter() - t0) / args.new_tokens)
    out = {"ms": ms, "kv_bytes": kv_bytes(cache), "view_changes": getattr(cache, "view_changes", None)}
    if args.profile_steps and _compiled(name) and args.device.startswith("cuda"):
        out.update(_profile(run, token, args.profile_steps))
    return out


def _profile(run, token: torch.Tensor, steps: int) -> dict:
    """CUDA kernel time per decoded token over ``steps`` steps and the top kernels (profiler table)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(steps, token)
        torch.cuda.synchronize()
    events = prof.key_averages()
    attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    gpu_us = sum(getattr(e, attr) for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"gpu_ms_per_token": gpu_us / 1000 / steps,
            "profile_table": events.table(sort_by=attr, row_limit=25, max_name_column_width=90)}


def _save_partial(rows: list[dict], out: str) -> None:
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "partial_rows.json").write_text(json.dumps(rows, indent=1, default=str))


def _compiled(name: str) -> bool:
    return name == "static_compiled" or name.startswith("compiled")


def bench(model, args) -> list[dict]:
    """The grid (context x batch x cache) with a global time budget; returns one row per config."""
    rows, start, compile_spent = [], time.perf_counter(), 0.0
    pairs = [(n, b) for n in args.contexts for b in args.batch_sizes]
    bar = tqdm(total=len(pairs) * len(args.caches), desc="bench_kv_e2e")
    for context, batch in pairs:
        states = token = None
        for name in args.caches:
            row = {"cache": name, "context": context, "batch": batch}
            bar.set_postfix_str(f"{name} n={context} b={batch}")
            try:
                if time.perf_counter() - start > args.time_budget_s:
                    raise TimeoutError(f"--time-budget-s={args.time_budget_s} spent")
                if _compiled(name) and compile_spent > args.compile_budget_s:
                    raise TimeoutError(f"--compile-budget-s={args.compile_budget_s} spent on static_compiled")
                if states is None:
                    states, token = prefill(model, context, batch, args.device)
                t0 = time.perf_counter()
                r = decode_one(model, name, states, token, args)
                compile_spent += time.perf_counter() - t0 if _compiled(name) else 0.0
                row.update(ms_per_token=statistics.median(r["ms"]), ms_runs=r["ms"], kv_gib=r["kv_bytes"] / 2**30,
                           view_changes=r.get("view_changes"), gpu_ms_per_token=r.get("gpu_ms_per_token"),
                           cudnn_sdpa=args.static_cudnn == "on" and name == "static_compiled"
                           and args.device.startswith("cuda"))
                if "profile_table" in r:
                    prof_dir = Path(args.out) / "profiles"
                    prof_dir.mkdir(parents=True, exist_ok=True)
                    (prof_dir / f"{name}_n{context}_b{batch}.txt").write_text(r["profile_table"])
            except Exception as err:  # noqa: BLE001  (OOM, missing backend, compile failure: recorded, run goes on)
                row["skipped"] = f"{type(err).__name__}: {str(err)[:160]}"
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            rows.append(row)
            _save_partial(rows, args.out)  # a run killed by an outer time limit keeps what it measured
            bar.update()
        del states
    bar.close()
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b", help="random-init Llama shape")
    p.add_argument("--contexts", default="1024,4096,16384,32768", help="comma-separated prompt lengths")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=2, help="timed runs (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (compiles static_compiled)")
    p.add_argument("--caches", default=",".join(CACHES), help=f"subset of {CACHES}")
    p.add_argument("--residual-length", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--time-budget-s", type=float, default=270.0, help="stop starting configs after this")
    p.add_argument("--compile-budget-s", type=float, default=90.0,
                   help="stop starting static_compiled configs (compile per shape) after this much time in them")
    p.add_argument("--static-cudnn", choices=("on", "off"), default="on",
                   help="cuDNN SDPA for static_compiled (fixed key length); always off for the eager caches")
    p.add_argument("--profile-steps", type=int, default=0, help="profile N steps of each compiled config (GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--out", default="results/bench_kv_e2e")
    return parse_grid_args(p, argv, CACHES)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if args.device.startswith("cuda"):
        # cuDNN SDPA builds an execution plan per new key length: every eager decode step at a new length paid
        # it, so whichever cache ran first at a shape looked several times slower (58-93 ms vs 13 ms, H100)
        torch.backends.cuda.enable_cudnn_sdp(False)
    model = build_model(args)
    t0 = time.perf_counter()
    rows = bench(model, args)
    env = environment(args.device, model=f"random-init {args.shape}", dtype=args.dtype, new_tokens=args.new_tokens,
                      repeats=args.repeats, warmup=args.warmup, wall_s=round(time.perf_counter() - t0, 1))
    card = env["card"]
    columns = ["cache", "context", "batch", "ms_per_token", "gpu_ms_per_token", "kv_gib", "view_changes", "cudnn_sdpa",
               "skipped"]
    notes = ("ms_per_token: median over timed runs of decode wall time / new tokens (warm-up excluded). kv_gib: live "
             "KV tensors after decoding (scales/zeros included; StaticCache counts its whole preallocated buffer). "
             "adaptive*: history dequantized every step; fused*: packed view read by the attention kernel; "
             "compiled*: AdaptiveStaticKVCache under transformers' compiled step (CUDA graphs), fused kernel. "
             f"cuDNN SDPA is off for every eager cache (it re-plans per key length); for static_compiled it is "
             f"{args.static_cudnn} (--static-cudnn). gpu_ms_per_token: CUDA kernel time per token from "
             f"--profile-steps (compiled configs only).")
    paths = write_report(args.out, "bench_kv_e2e", {"rows": rows, "args": vars(args)}, env,
                         markdown_table(rows, columns), f"End-to-end decode: random-init {args.shape} on {card}", notes)
    plot_by_context(Path(args.out) / "bench_kv_e2e.png", rows, f"{args.shape} {args.dtype} on {card}", E2E_SERIES)
    print(markdown_table(rows, columns))
    print("wrote", {k: str(v) for k, v in paths.items()}, "and bench_kv_e2e.png")


if __name__ == "__main__":
    main()
