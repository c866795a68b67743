"""GPU A/B of decode-kernel sources: the same launcher, several versions of ``_triton_kernels.py``, one run.

A kernel change is judged on the path the caches launch, not only on the benchmark's: each shape is timed through a
plain packed view (tables passed to the kernel, as ``bench_decode_attention.py`` does), through a static view that
reaches its pools through an address book with device lengths (``book``), and through that view with the key mask
``model.generate`` always passes (``book_mask``: every key attended, the mask padded to the view's capacity,
exactly what ``AdaptiveStaticKVCache`` hands the kernel inside ``generate``), for a history of one precision and
for one that mixes 8- and 4-bit blocks. Every (variant, view, chunk, register cap) is timed with CUDA-graph replays
over inputs rotated past the L2 cache (``bench_decode_attention.cold_copies``), and checked against dequantize +
sdpa.

Make a variant file from git history, e.g. the kernel before a change:
    git show <rev>:hf_adaptive/attention/_triton_kernels.py > /tmp/k_base.py
Run (GPU):
    python eval/bench_kernel_variants.py --variants base=/tmp/k_base.py,new=hf_adaptive/attention/_triton_kernels.py \
        --out eval/results/kv_decode_kernel_variants_h100
Re-render the report of a finished run:  python eval/bench_kernel_variants.py --render DIR/results.json --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import importlib.util
import json
import sys
from pathlib import Path

from _common import environment, pyplot, save_figure, time_op  # first: sets the offline default

SHAPES = [(1, 65536, 4, True), (1, 65536, 4, False), (8, 4096, 4, True), (8, 32768, 4, True), (8, 32768, 4, False),
          (8, 32768, 8, True)]  # (batch, context, bits, mixed: one block at 8 bits among the others)
VIEWS = ("plain", "book", "book_mask")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="", help="comma-separated NAME=PATH of kernel sources (_triton_kernels.py)")
    p.add_argument("--out", type=Path, required=True, help="directory for results.json / results.md / variants.png")
    p.add_argument("--chunks", default="32,64", help="DecodeKernelConfig.chunk values")
    p.add_argument("--max-registers", default="none,168,128", help="DecodeKernelConfig.max_registers values")
    p.add_argument("--stages", default="3", help="DecodeKernelConfig.num_stages values (Triton's pipelining depth)")
    p.add_argument("--warps", default="none", help="DecodeKernelConfig.num_warps values (none: the head dim's default)")
    p.add_argument("--waves", default="2", help="DecodeKernelConfig.waves values (programs per SM the splits aim "
                   "at)")
    p.add_argument("--views", default=",".join(VIEWS), help=f"comma-separated subset of {VIEWS}")
    p.add_argument("--shapes", default=None, help="comma-separated BATCHxCONTEXTxBITS[m] (m: mixed) subset of "
                   f"the default shapes, e.g. 8x32768x4,1x65536x4 (default: all {len(SHAPES)})")
    p.add_argument("--render", type=Path, default=None, help="only re-render the report of this results.json")
    args = p.parse_args(argv)
    args.shapes = SHAPES if args.shapes is None else [_shape(p, text) for text in args.shapes.split(",") if text]
    args.views = [v.strip() for v in args.views.split(",") if v.strip()]
    unknown = sorted(set(args.views) - set(VIEWS))
    if unknown or not args.views:
        p.error(f"--views={','.join(args.views)}: each must be one of {VIEWS} (at least one); unknown {unknown}")
    return args


def _shape(parser: argparse.ArgumentParser, text: str) -> tuple[int, int, int, bool]:
    """BATCHxCONTEXTxBITS[m] -> (batch, context, bits, mixed)."""
    parts = text.strip().rstrip("m").split("x")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        parser.error(f"--shapes: {text!r} is not BATCHxCONTEXTxBITS[m], e.g. 8x32768x4 or 8x32768x8m")
    return int(parts[0]), int(parts[1]), int(parts[2]), text.strip().endswith("m")


def load_variant(name: str, path: Path):
    """A kernel module from a source file (its own Triton JIT cache, so variants never share a build)."""
    spec = importlib.util.spec_from_file_location(f"kernel_variant_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import bench_decode_attention as bda
    from test_attention_triton import _as_static  # the static view with an address book, as the tests build it

    from hf_adaptive.attention import triton_decode
    from hf_adaptive.attention.reference import gather_packed_kv

    variants = dict(item.split("=", 1) for item in args.variants.split(",") if item)
    if not variants:
        raise SystemExit("--variants is empty: give NAME=PATH pairs, e.g. base=/tmp/k_base.py,new=hf_adaptive/...")
    modules = {name: load_variant(name, Path(path)) for name, path in variants.items()}
    caps = [None if c.strip().lower() == "none" else int(c) for c in args.max_registers.split(",")]
    chunks = [int(c) for c in args.chunks.split(",")]
    stages = [int(s) for s in args.stages.split(",")]
    warps = [None if w.strip().lower() == "none" else int(w) for w in args.warps.split(",")]
    waves = [int(w) for w in args.waves.split(",")]
    rows = []
    for batch, context, bits, mixed in args.shapes:
        q, _, _, packed = bda.make_inputs(batch, context, bits, mixed=mixed)
        n_bytes = bda.packed_bytes(packed)
        copies = [(q, packed)] + [bda.make_inputs(batch, context, bits, seed=i, mixed=mixed)[::3]
                                  for i in range(1, bda.cold_copies(n_bytes))]
        views = {view: [(c[0], *_view(view, c[1], _as_static)) for c in copies] for view in args.views}
        want = torch.nn.functional.scaled_dot_product_attention(q, *gather_packed_kv(packed, q.dtype), scale=0.125,
                                                                enable_gqa=True).float()
        out = torch.empty_like(q)
        for name, module in modules.items():
            triton_decode.kernels = module
            for view, inputs in views.items():
                got = triton_decode.triton_decode_attention(inputs[0][0], inputs[0][1], scaling=0.125,
                                                            key_mask=inputs[0][2]).float()
                rel_err = ((got - want).abs().max() / want.abs().max()).item()
                for chunk, cap, stage, warp, wave in itertools.product(chunks, caps, stages, warps, waves):
                    cfg = triton_decode.DecodeKernelConfig(chunk=chunk, max_registers=cap, num_stages=stage,
                                                           num_warps=warp, waves=wave)
                    fn = bda.rotating([lambda c=c, cfg=cfg: triton_decode.triton_decode_attention(
                        c[0], c[1], scaling=0.125, out=out, config=cfg, key_mask=c[2]) for c in inputs])
                    us = time_op(fn, 10, 20) / len(inputs)
                    rows.append(dict(variant=name, view=view, batch=batch, context=context, bits=bits,
                                     mixed=mixed, chunk=chunk, maxreg=cap, stages=stage, warps=warp, waves=wave,
                                     us=us, GBps=n_bytes / us / 1e3, rel_err=rel_err))
                    print(json.dumps(rows[-1]), flush=True)
        del copies, views
        torch.cuda.empty_cache()
    sources = {name: {"path": path, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}
               for name, path in variants.items()}
    return {"env": environment("cuda"), "variants": sources, "rows": rows}


def _view(view: str, packed, as_static) -> tuple:
    """(packed view, key mask or None) of one input copy as ``view`` reads it."""
    import torch

    if view == "plain":
        return packed, None
    if view == "book":
        return as_static(packed, None, {}, True), None
    kw: dict = {}  # book_mask: every key attended; as_static widens the mask to the view's capacity (False past it)
    static = as_static(packed, torch.ones(packed.tail_k.shape[0], packed.num_tokens, dtype=torch.bool,
                                          device=packed.tail_k.device), kw, True)
    return static, kw["key_mask"]


def write_report(result: dict, out: Path) -> None:
    """results.md: per shape and view, µs and GB/s of every variant at every launch setting; a PNG of the defaults."""
    env = result["env"]
    lines = [f"# Decode-kernel variants — {env['card']}", "",
             f"torch {env['torch']}, triton {env['triton']}; command: `{env['command']}`", "",
             "Variants: " + ", ".join(f"`{n}` = {v['path']} (sha256 {v['sha256'][:12]})"
                                      for n, v in result["variants"].items()), "",
             "µs per call (CUDA-graph replays over inputs rotated past L2); GB/s = packed bytes / time. "
             "`book`: the static view with an address book and device lengths; `book_mask`: the same with the key "
             "mask `model.generate` passes (the adaptive caches' path inside `generate`).", "",
             "| batch | context | bits | mixed | view | variant | chunk | max registers | stages | warps | waves | µs | "
             "GB/s | rel err |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['context']} | {r['bits']} | {r['mixed']} | {r['view']} | {r['variant']} | "
                     f"{r['chunk']} | {r['maxreg'] or '-'} | {r.get('stages', 3)} | {r.get('warps') or '-'} | "
                     f"{r.get('waves', 2)} | {r['us']:.1f} | {r['GBps']:.0f} | {r['rel_err']:.1e} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()
    default = [r for r in result["rows"] if r["chunk"] == 64 and r["maxreg"] is None]
    labels = sorted({(r["batch"], r["context"], r["bits"], r["mixed"], r["view"]) for r in default})
    stages = sorted({(r.get("stages", 3), r.get("warps") or 0, r.get("waves", 2)) for r in default})
    names = [(v, st) for v in result["variants"] for st in stages]  # one bar per variant and launch setting
    fig, ax = plt.subplots(figsize=(min(18, max(8, 1.3 * len(labels))), 5))
    width = 0.8 / max(len(names), 1)
    for i, (name, st) in enumerate(names):
        us = {(r["batch"], r["context"], r["bits"], r["mixed"], r["view"]): r["us"] for r in default
              if r["variant"] == name and (r.get("stages", 3), r.get("warps") or 0, r.get("waves", 2)) == st}
        ax.bar([j + i * width for j in range(len(labels))], [us.get(lab, 0) for lab in labels], width,
               label=name if len(stages) == 1 else f"{name}, {st[0]} stages" + (f", {st[1]} warps" if st[1] else "")
               + (f", {st[2]} waves" if st[2] != 2 else ""))
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels([f"{b}x{c // 1024}k {bits}b{' mixed' if m else ''}\n{v}" for b, c, bits, m, v in labels],
                       fontsize=7)
    ax.set(ylabel="µs per decode call (chunk 64, no register cap)", title=f"decode-kernel variants — {env['card']}")
    ax.legend()
    save_figure(fig, out / "variants.png")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        result = json.loads(args.render.read_text())
    else:
        result = run(args)
        (args.out / "results.json").write_text(json.dumps(result, indent=1))
    write_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
