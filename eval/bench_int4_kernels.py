"""GPU benchmark: one decode-shaped matmul per kernel: bf16, PyTorch's int4 tinygemm, our Triton int4 (tuned).

Shapes: every distinct linear of a decode step (q/k/v and gate/up fused, as ``prepare_tiers`` runs them, and
lm_head) of Llama-3.1-8B, Llama-3.2-1B and Qwen2.5-1.5B; 1 and 8 activation rows. Timing: each op captured
``--inner`` times in a CUDA graph and replayed (``_common.time_op``); median µs per call. The
byte floor is (bytes the op must read) / (measured device-copy bandwidth). Both int4 kernels use the same
codes, scales and zeros (group 128); the relative error is against x @ dequant(W).T in float32.

Run:  python eval/bench_int4_kernels.py --out results/int4_kernels   (eval/gpu/run.sh precision int4-kernels)
Writes results.json, results.md and int4_kernels.png under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import copy_bandwidth_bytes_per_us, environment, pyplot, save_figure, time_op  # first: sets the offline default
import torch
from tqdm import tqdm

from hf_adaptive.precision.int4 import (GROUP_SIZES, INNER_K_TILES, choose_group_size, dequantize_int4_reference,
                                       int4_linear, pack_int4)
from hf_adaptive.precision.int4_triton import dequantize_triton_int4, int4_triton_linear, pack_int4_triton, tuned_launch

SHAPES = {  # (N, K) of each distinct decode linear, siblings fused
    "llama-3.1-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
                     "lm_head": (128256, 4096)},
    "llama-3.2-1b": {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
                     "lm_head": (128256, 2048)},
    "qwen2.5-1.5b": {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960),
                     "lm_head": (151936, 1536)},
}


def _group_tiles(text: str) -> tuple[int, int]:
    """``--tinygemm`` GROUP:INNER_K_TILES, checked against what tinygemm packs (before any GPU work)."""
    try:
        group, tiles = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tinygemm takes GROUP:INNER_K_TILES such as 64:8, got {text!r}") from None
    if group not in GROUP_SIZES or tiles not in INNER_K_TILES:
        raise argparse.ArgumentTypeError(f"--tinygemm {text}: the group must be one of {GROUP_SIZES} and the inner "
                                         f"K tiles one of {INNER_K_TILES}")
    return group, tiles


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--inner", type=int, default=20, help="ops per captured graph")
    p.add_argument("--reps", type=int, default=20, help="graph replays timed")
    p.add_argument("--tinygemm", type=_group_tiles, nargs="*", default=[],
                   help="extra tinygemm packings as GROUP:INNER_K_TILES, e.g. 64:8 256:8 128:4")
    p.add_argument("--code-dot", action="store_true",
                   help="also time the fastest code-dot launch of our Triton kernel on its own")
    return p.parse_args(argv)


def bench_shape(n: int, k: int, rows: list[int], args, bandwidth: float) -> list[dict]:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    g = choose_group_size(k, n, 128)
    start = time.perf_counter()
    tri = pack_int4_triton(w, g, torch.bfloat16)  # includes the per-shape tuning
    tune_s = time.perf_counter() - start
    tiny = pack_int4(w, g, torch.bfloat16)
    variants = {}  # tinygemm at other group sizes and inner K tiles (the same weights, requantized per group)
    for spec in args.tinygemm:
        vg, tiles = spec
        if k % vg == 0 and k % (16 * tiles) == 0:
            variants[f"tinygemm_g{vg}_t{tiles}"] = pack_int4(w, vg, torch.bfloat16, inner_k_tiles=tiles)
    dot = None
    if args.code_dot:  # the fastest code-dot launch, even where the elementwise gemv won the tuning
        dot = pack_int4_triton(w, g, torch.bfloat16, tune=False)
        dot.gemv = tuned_launch(n, k, g, torch.bfloat16, w.device.index or 0, dot=True)
    ref_w = dequantize_triton_int4(tri)
    out = []
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ ref_w.T
        tiny_ref = x.float() @ dequantize_int4_reference(w, g).T
        us = {"bf16": time_op(lambda: torch.nn.functional.linear(x, w), args.inner, args.reps),
              "tinygemm": time_op(lambda: int4_linear(x, tiny), args.inner, args.reps),
              "triton": time_op(lambda: int4_triton_linear(x, tri), args.inner, args.reps)}
        for name, packed in variants.items():
            us[name] = time_op(lambda packed=packed: int4_linear(x, packed), args.inner, args.reps)
        if dot is not None:
            us["code_dot"] = time_op(lambda: int4_triton_linear(x, dot), args.inner, args.reps)
        bf16_bytes, int4_bytes = 2 * n * k, tri.nbytes()
        out.append({"N": n, "K": k, "rows": m, "group": g, "us": us, "triton_launch": tri.gemv.__dict__,
                    "code_dot_launch": dot.gemv.__dict__ if dot is not None else None,
                    "int4_GBps": {name: int4_bytes / t / 1e3 for name, t in us.items() if name != "bf16"},
                    "tune_s": tune_s, "triton_vs_bf16": us["bf16"] / us["triton"],
                    "tinygemm_vs_bf16": us["bf16"] / us["tinygemm"], "triton_vs_tinygemm": us["tinygemm"] / us["triton"],
                    "floor_us": {"bf16": bf16_bytes / bandwidth, "int4": int4_bytes / bandwidth},
                    "rel_err": {"triton": float((int4_triton_linear(x, tri).float() - ref).abs().max() / ref.abs().max()),
                                "tinygemm": float((int4_linear(x, tiny).float() - tiny_ref).abs().max()
                                                  / tiny_ref.abs().max())}})
    return out


def write(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    lines = [f"# int4 weight-only matmul kernels ({result['card']})", "",
             f"torch {result['torch']}, triton {result['triton']}; device-copy bandwidth "
             f"{result['copy_bandwidth_GBps']:.0f} GB/s", "", f"Command: `{result['command']}`", "",
             "Median µs per call over CUDA-graph replays; floor = bytes read / copy bandwidth; group 128.", "",
             "| model | linear | N x K | rows | bf16 µs | tinygemm µs | triton µs | triton vs bf16 | "
             "tinygemm vs bf16 | triton vs tinygemm | int4 floor µs | triton launch | rel err triton / tinygemm |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        launch = r["triton_launch"]
        lines.append(f"| {r['model']} | {r['linear']} | {r['N']}x{r['K']} | {r['rows']} | {r['us']['bf16']:.1f} | "
                     f"{r['us']['tinygemm']:.1f} | {r['us']['triton']:.1f} | {r['triton_vs_bf16']:.2f} | "
                     f"{r['tinygemm_vs_bf16']:.2f} | {r['triton_vs_tinygemm']:.2f} | {r['floor_us']['int4']:.1f} | "
                     f"{'dot ' if launch.get('dot') else ''}{launch['block_j']}/{launch['block_k']}/"
                     f"{launch['split_k']}/{launch['num_warps']} | "
                     f"{r['rel_err']['triton']:.4f} / {r['rel_err']['tinygemm']:.4f} |")
    extra = sorted({name for r in result["rows"] for name in r["us"]} - {"bf16", "tinygemm", "triton"})
    if extra:
        lines += ["", "Other kernels and packings, µs per call (GB/s of packed int4 bytes):", "",
                  "| model | linear | rows | tinygemm | " + " | ".join(extra) + " | code-dot launch |",
                  "|---|---|---|---|" + "---|" * len(extra) + "---|"]
        for r in result["rows"]:
            cells = [f"{r['us'][name]:.1f} ({r['int4_GBps'][name]:.0f})" if name in r["us"] else "" for name in extra]
            launch = r.get("code_dot_launch") or {}
            lines.append(f"| {r['model']} | {r['linear']} | {r['rows']} | {r['us']['tinygemm']:.1f} "
                         f"({r['int4_GBps']['tinygemm']:.0f}) | " + " | ".join(cells) + " | "
                         + (f"{launch['block_j']}/{launch['block_k']}/{launch['split_k']}/{launch['num_warps']}"
                            if launch else "") + " |")
    for model, per in result.get("step_sums", {}).items():
        lines.append("")
        lines.append(f"{model}, sum over one decode step's linears at 1 row (32/16/28 layers + lm_head): "
                     + ", ".join(f"{k} {v:.0f} µs" for k, v in per.items()))
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    plot(out_dir / "int4_kernels.png", result)


def plot(path: Path, result: dict) -> None:
    plt = pyplot()
    rows = [r for r in result["rows"] if r["rows"] == 1]
    if not rows:
        return
    labels = [f"{r['model']}\n{r['linear']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.6), 4))
    ax.bar([x - 0.2 for x in xs], [r["tinygemm_vs_bf16"] for r in rows], 0.4, label="tinygemm")
    ax.bar([x + 0.2 for x in xs], [r["triton_vs_bf16"] for r in rows], 0.4, label="triton (ours)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed vs bf16 (x), 1 row")
    ax.set_title(f"int4 weight-only matmul, {result['card']}")
    ax.legend()
    save_figure(fig, path)


LAYERS = {"llama-3.1-8b": 32, "llama-3.2-1b": 16, "qwen2.5-1.5b": 28}


def main(argv=None) -> None:
    args = parse_args(argv)
    bandwidth = copy_bandwidth_bytes_per_us()
    result = {**environment("cuda"), "copy_bandwidth_GBps": bandwidth * 1e-3, "rows": [], "step_sums": {}}
    todo = [(model, name, nk) for model in args.models for name, nk in SHAPES[model].items()]
    for model, name, (n, k) in tqdm(todo, desc="shapes"):
        for r in bench_shape(n, k, args.rows, args, bandwidth):
            result["rows"].append({"model": model, "linear": name, **r})
        write(Path(args.out), result)
    for model in args.models:
        one = [r for r in result["rows"] if r["model"] == model and r["rows"] == 1]
        sums = {kern: sum(r["us"][kern] * (1 if r["linear"] == "lm_head" else LAYERS[model]) for r in one)
                for kern in one[0]["us"] if all(kern in r["us"] for r in one)}
        result["step_sums"][model] = sums
    write(Path(args.out), result)
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
