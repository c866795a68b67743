"""GPU benchmark: fused packed-KV decode attention vs dequantize-then-sdpa vs bf16 sdpa.

Shape: Llama-3.2-1B attention (32 query heads, 8 kv heads, head dim 64), one decode token per sequence,
contexts 1k/4k/16k/32k, batch 1 and 8, history blocks at 16/8/4 bits (64-token blocks, 64-token exact tail).
Timing: each op is captured ``--inner`` times in a CUDA graph and replayed; the median over ``--reps``
replays divided by ``--inner`` is reported (falls back to ``triton.testing.do_bench`` medians if capture
fails). The fused kernel and bf16 sdpa rotate through enough copies of their inputs to exceed twice the L2 cache,
so their bytes come from HBM as in a model. The byte floor of each config is (bytes the op must read) / (measured
device-copy bandwidth). ``--sweep-only`` times launch configurations (chunk, waves, max splits, register cap)
instead of the grid.

Run:  python eval/bench_decode_attention.py --out results/decode_attention   (eval/gpu/run.sh kv attention)
Writes results.json, results.md and decode_attention.png under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from _common import copy_bandwidth_bytes_per_us, environment, pyplot, save_figure, time_op  # first: sets the offline default
import torch
from tqdm import tqdm

from hf_adaptive.kv.build import pack_dense_kv
from hf_adaptive.attention.reference import gather_packed_kv
from hf_adaptive.attention.triton_decode import DecodeKernelConfig, triton_decode_attention

logger = logging.getLogger(__name__)
Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK, TAIL, GROUP = 32, 8, 64, 64, 64, 64  # block/group: KVCacheConfig defaults


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for results.json / results.md / decode_attention.png")
    p.add_argument("--contexts", default="1024,4096,16384,32768", help="comma-separated context lengths")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--bits", default="16,8,4", help="comma-separated history precisions")
    p.add_argument("--inner", type=int, default=20, help="ops per captured graph")
    p.add_argument("--reps", type=int, default=30, help="graph replays timed (median taken)")
    p.add_argument("--sweep", action="store_true",
                   help="also time kernel launch configs (chunk, waves, max splits, max registers)")
    p.add_argument("--sweep-only", action="store_true", help="time only the launch-config sweep (implies --sweep)")
    return p.parse_args(argv)


def make_inputs(batch: int, context: int, bits: int, seed: int = 0, mixed: bool = False):
    """Query, dense bf16 KV and its packed form (history at ``bits``, 64-token tail) for one config; ``mixed``: the
    first block at 8 bits instead (both quantized pools then exist, so the kernel compiles both paths)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, KV_HEADS, context, HEAD_DIM)
    k = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16)
    n_blocks = (context - TAIL) // BLOCK
    block_bits = [8 if mixed and i == 0 else bits for i in range(n_blocks)]
    packed = pack_dense_kv(k, v, block_bits, block_size=BLOCK, value_group=GROUP, spare_slots=0, seed=seed)
    return q, k, v, packed


def packed_bytes(packed) -> int:
    """Bytes the fused kernel must read: every used code/scale/zero/bf16 row, the tail, query excluded."""
    total = packed.full_k.numel() * packed.full_k.element_size() * 2
    total += packed.tail_k.numel() * packed.tail_k.element_size() * 2
    for pool in packed.pools.values():
        total += sum(t.numel() * t.element_size() for t in (pool.k_codes, pool.k_scale, pool.k_zero,
                                                              pool.v_codes, pool.v_scale, pool.v_zero))
    return total


def time_eager(fn, calls: int = 50) -> float:
    """Wall-clock microseconds per call of ``calls`` back-to-back eager calls: includes Python/launch overhead,
    which is what an un-graphed ``generate`` pays per layer and token."""
    import time

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6 / calls


def cold_copies(n_bytes: int) -> int:
    """How many copies of an input the timed calls rotate through so that their bytes exceed twice the L2 cache:
    in a model each layer's KV is read once per step, after the other layers have flushed L2, so a benchmark that
    re-reads one small input from L2 overstates the kernel's bandwidth."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(64, -(-2 * l2 // max(n_bytes, 1))))


def rotating(fns: list):
    """One callable that runs each of ``fns`` once (time it, then divide by ``len(fns)``)."""
    return lambda: [fn() for fn in fns]


def bench_config(batch, context, bits, args, bandwidth) -> dict:
    """Times of the three methods for one (batch, context, bits), with a correctness check. The fused kernel and
    bf16 sdpa rotate through :func:`cold_copies` inputs (their reads come from HBM, as in a model)."""
    q, k, v, packed = make_inputs(batch, context, bits)
    scale = HEAD_DIM**-0.5
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out = torch.empty_like(q)
    n_fused = cold_copies(packed_bytes(packed))
    n_dense = cold_copies(2 * k.numel() * k.element_size())
    copies = [(q, k, v, packed)] + [make_inputs(batch, context, bits, seed=i)
                                    for i in range(1, max(n_fused, n_dense))]
    ops = {
        "fused_packed": (rotating([lambda c=c: triton_decode_attention(c[0], c[3], scaling=scale, out=out)
                                   for c in copies[:n_fused]]), n_fused),
        "dequant_sdpa": (lambda: sdpa(q, *gather_packed_kv(packed, q.dtype), scale=scale, enable_gqa=True), 1),
        "bf16_sdpa": (rotating([lambda c=c: sdpa(c[0], c[1], c[2], scale=scale, enable_gqa=True)
                                for c in copies[:n_dense]]), n_dense),
    }
    want = sdpa(q, *gather_packed_kv(packed, q.dtype), scale=scale, enable_gqa=True).float()
    got = triton_decode_attention(q, packed, scaling=scale).float()
    rel_err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    row = {"batch": batch, "context": context, "bits": bits, "rel_err_vs_dequant_sdpa": rel_err,
           "packed_bytes": packed_bytes(packed), "bf16_bytes": 2 * k.numel() * k.element_size()}
    for name, (fn, n) in ops.items():
        row[f"{name}_us"] = time_op(fn, args.inner, args.reps) / n
        row[f"{name}_eager_us"] = time_eager(fn) / n
        row[f"{name}_copies"] = n
    row["fused_floor_us"] = row["packed_bytes"] / bandwidth
    row["bf16_floor_us"] = row["bf16_bytes"] / bandwidth
    row["fused_fraction_of_floor"] = row["fused_floor_us"] / row["fused_packed_us"]
    row["fused_GBps"] = row["packed_bytes"] / row["fused_packed_us"] / 1e3  # achieved: bytes read / kernel time
    if rel_err > 2e-2:
        logger.error("fused kernel disagrees with dequantize+sdpa: rel err %.3g at %s", rel_err, row)
    return row


def sweep_configs(args) -> list[dict]:
    """Kernel launch knobs on representative shapes, to pick better defaults.

    Each shape runs twice: with the history at one precision (only that pool compiled in) and with one block at
    8 bits among 4-bit ones ("mixed": both quantized paths compiled in, the register footprint of a cache that
    can hold 16, 8 and 4 bits, as the adaptive caches do)."""
    rows = []
    shapes = [(1, 16384, 4, False), (1, 65536, 4, False), (1, 65536, 4, True), (8, 4096, 4, True),
              (8, 32768, 4, False), (8, 32768, 4, True), (8, 32768, 8, False), (8, 32768, 16, False)]
    configs = [DecodeKernelConfig(chunk=c, waves=s, max_splits=m, max_registers=r)
               for c in (32, 64) for s in (2, 4, 8) for m in (64, 256) for r in (None, 168, 128)]
    for batch, context, bits, mixed in tqdm(shapes, desc="sweep"):
        q, _, _, packed = make_inputs(batch, context, bits, mixed=mixed)
        out = torch.empty_like(q)
        n_bytes = packed_bytes(packed)
        copies = [(q, packed)] + [make_inputs(batch, context, bits, seed=i, mixed=mixed)[::3]
                                  for i in range(1, cold_copies(n_bytes))]
        for cfg in configs:
            fn = rotating([lambda c=c, cfg=cfg: triton_decode_attention(c[0], c[1], scaling=0.125, out=out, config=cfg)
                           for c in copies])
            rows.append({"batch": batch, "context": context, "bits": bits, "mixed": mixed, "chunk": cfg.chunk,
                         "num_warps": cfg.num_warps, "waves": cfg.waves, "max_splits": cfg.max_splits,
                         "num_stages": cfg.num_stages, "max_registers": cfg.max_registers,
                         "us": time_op(fn, args.inner, args.reps) / len(copies)})
            rows[-1]["GBps"] = n_bytes / rows[-1]["us"] / 1e3
            logger.info("sweep row %s", json.dumps(rows[-1]))
        best = min((r for r in rows if r["context"] == context and r["batch"] == batch and r["bits"] == bits
                    and r["mixed"] == mixed), key=lambda r: r["us"])
        logger.info("sweep best at %s: %s", (batch, context, bits, mixed), best)
    return rows


def write_markdown(result: dict, path: Path) -> None:
    """A table per batch size: microseconds per method, speedups, byte floor and its attained fraction."""
    env = result["env"]
    lines = [f"# Decode attention over the packed KV cache — {env['card']}", "",
             f"torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}; "
             f"copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s", "", f"Command: `{env['command']}`", "",
             f"Shape: {Q_HEADS} q heads, {KV_HEADS} kv heads, head dim {HEAD_DIM}, block {BLOCK}, tail {TAIL}, value group {GROUP}; "
             "median µs per call (CUDA-graph replays); eager = wall-clock of back-to-back un-graphed calls "
             "(includes Python and launch overhead).", "",
             "| batch | context | bits | fused µs | dequant+sdpa µs | bf16 sdpa µs | fused vs bf16 | "
             "floor µs | % of floor | fused GB/s | rel err | eager µs fused / dequant / bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['context']} | {r['bits']} | {r['fused_packed_us']:.1f} | "
                     f"{r['dequant_sdpa_us']:.1f} | {r['bf16_sdpa_us']:.1f} | "
                     f"{r['bf16_sdpa_us'] / r['fused_packed_us']:.2f}x | {r['fused_floor_us']:.1f} | "
                     f"{100 * r['fused_fraction_of_floor']:.0f}% | {r['fused_GBps']:.0f} | "
                     f"{r['rel_err_vs_dequant_sdpa']:.1e} | "
                     f"{r['fused_packed_eager_us']:.0f} / {r['dequant_sdpa_eager_us']:.0f} / "
                     f"{r['bf16_sdpa_eager_us']:.0f} |")
    if result["sweep"]:
        lines += ["", "## Launch-config sweep (fused kernel, µs)", "",
                  "| batch | context | bits | mixed | chunk | warps | waves | max splits | max registers | µs | GB/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['context']} | {r['bits']} | {r['mixed']} | {r['chunk']} | {r['num_warps']} | "
                  f"{r['waves']} | {r['max_splits']} | {r['max_registers']} | {r['us']:.1f} | {r['GBps']:.0f} |"
                  for r in result["sweep"]]
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> None:
    """µs per decode call vs context, one panel per batch size; fused kernel per bits vs the two baselines."""
    plt = pyplot()
    batches = sorted({r["batch"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rows = [r for r in result["rows"] if r["batch"] == batch]
        for i, bits in enumerate(sorted({r["bits"] for r in rows}, reverse=True)):
            sel = sorted((r for r in rows if r["bits"] == bits), key=lambda r: r["context"])
            ctx, color = [r["context"] for r in sel], f"C{i}"
            ax.plot(ctx, [r["fused_packed_us"] for r in sel], "o-", color=color, label=f"fused, {bits}-bit")
            ax.plot(ctx, [r["dequant_sdpa_us"] for r in sel], "x--", color=color, label=f"dequant+sdpa, {bits}-bit")
            ax.plot(ctx, [r["fused_floor_us"] for r in sel], ":", color=color, alpha=0.5,
                    label=f"byte floor, {bits}-bit")
        sel = sorted((r for r in rows if r["bits"] == max(r2["bits"] for r2 in rows)), key=lambda r: r["context"])
        ax.plot([r["context"] for r in sel], [r["bf16_sdpa_us"] for r in sel], "s-k", label="bf16 sdpa (dense)")
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="µs per decode call",
               title=f"batch {batch} — {result['env']['card']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_attention needs a CUDA GPU (torch.cuda.is_available() is False).")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth_bytes_per_us()
    grid = [(b, c, bits) for b in _ints(args.batches) for c in _ints(args.contexts) for bits in _ints(args.bits)]
    grid = [] if args.sweep_only else grid
    rows = [bench_config(b, c, bits, args, bandwidth) for b, c, bits in tqdm(grid, desc="configs")]
    result = {"env": environment("cuda"), "copy_bandwidth_GBps": bandwidth * 1e-3, "rows": rows,
              "sweep": sweep_configs(args) if args.sweep or args.sweep_only else []}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out_dir / "results.md")
    if rows:
        write_plot(result, out_dir / "decode_attention.png")
    print((out_dir / "results.md").read_text())
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


if __name__ == "__main__":
    sys.exit(main())
