"""Registers per thread of the fused decode kernel, compiled ahead of time for a GPU target on any machine.

The kernel's speed at long context is set by how many programs an SM holds (registers per thread x threads per
program against the SM's 64K registers) and by the bytes each has in flight, not by arithmetic. This script builds
the kernel for ``--arch`` (default sm_90) with ``triton.compile`` (no GPU needed), reads the cubin's resource usage
with the ``cuobjdump`` that ships with Triton, and prints registers, spills, shared memory and the resulting programs
per SM for the configurations the caches launch:

- ``adaptive``: 16/8/4-bit paths, the address book and device lengths (``AdaptiveStaticKVCache``);
- ``fixed4`` / ``fixed8`` / ``fixed16``: one quantized precision (or none) beside the 16-bit path, tables passed
  directly (``pack_dense_kv`` with one precision, as in ``bench_decode_attention.py``).

It also counts the SASS instructions of each loop of the build (``nvdisasm``, also shipped with Triton): one iteration
folds one chunk, and every warp of the program issues it, so instructions per iteration x warps is what an SM issues
per chunk. The adaptive build's loops are its 16-, 8- and 4-bit history walks and the exact tail, in that order. The
count is not a time: on an H100 a build issuing fewer instructions per chunk ran slower (the walk waits on latency
at ~8 warps per SM, ``eval/results/kv_decode_launch_waves_h100``), so time kernel changes on a GPU.
``--mask`` builds with the key mask ``model.generate`` always passes; ``--stages`` is the launch's pipelining depth.

Run:  python eval/kernel_registers.py [--arch 90] [--chunks 32,64] [--warps 4,8] [--mask] [--stages 5] [--out DIR]
      [--kernel-source NAME=PATH ...]   (also build older kernel sources, e.g. from `git show REV:...`)
The numbers belong to the installed Triton version (they move between releases); compare configurations in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "adaptive": dict(HAS8=True, HAS4=True, DEVICE_LENS=True, BOOK=True),
    "fixed4": dict(HAS4=True),
    "fixed8": dict(HAS8=True),
    "fixed16": dict(),
}
SM_REGISTERS = 65536


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability to build for (90 = Hopper)")
    p.add_argument("--chunks", default="32,64", help="comma-separated DecodeKernelConfig.chunk values")
    p.add_argument("--warps", default="4", help="comma-separated num_warps values")
    p.add_argument("--head-dim", type=int, default=64, help="head dim D (the Llama-3.2-1B shape: 64)")
    p.add_argument("--kernel-source", action="append", default=[],
                   help="NAME=PATH of another _triton_kernels.py to build beside the installed one (repeatable)")
    p.add_argument("--mask", action="store_true", help="build with a key mask (HAS_MASK), as model.generate runs it")
    p.add_argument("--stages", type=int, default=None, help="num_stages of the builds (default: Triton's, 3)")
    p.add_argument("--out", type=Path, default=None, help="also write registers.json and registers.md here")
    return p.parse_args(argv)


def resource_usage(constexprs: dict, arch: int, num_warps: int, kernels=None, num_stages: int | None = None) -> dict:
    """Registers, spill/stack bytes, shared memory and SASS instructions per iteration of each loop of one build of
    the kernel (of ``kernels``, a kernel module; default the installed one)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_adaptive.attention import triton_decode

    fn = (kernels or triton_decode.kernels).decode_split_kernel
    kernel = triton.compile(ASTSource(fn=fn, signature=triton_decode.kernel_signature(constexprs), constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {})})
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        text = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{text}")
    regs, stack = int(match.group(1)), int(match.group(2))
    return {"registers": regs, "stack_bytes": stack, "shared_bytes": kernel.metadata.shared,
            "programs_per_sm_by_registers": SM_REGISTERS // (regs * 32 * num_warps),
            "loop_instructions": loop_instructions(sass)}


def loop_instructions(sass: str, smallest: int = 64) -> list[int]:
    """SASS instructions of each loop body in ``nvdisasm -c`` output, in program order: a loop is a backward branch
    to a label, its body the instructions from the label to the branch. Loops under ``smallest`` instructions
    (address arithmetic, the split merge) are left out."""
    labels: dict[str, int] = {}
    count, sizes = 0, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = count
            continue
        if not re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+\S", line):
            continue
        count += 1
        target = re.search(r"\bBRA\s+(?:`\()?(\.L_x_\d+)", line)
        if target and target.group(1) in labels and count - labels[target.group(1)] >= smallest:
            sizes.append(count - labels[target.group(1)])
    return sizes


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import importlib.util

    from tqdm import tqdm

    sources = {"installed": None}
    for item in args.kernel_source:
        name, _, path = item.partition("=")
        spec = importlib.util.spec_from_file_location(f"kernel_source_{name}", path)
        sources[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sources[name])
    d = args.head_dim
    base = dict(GROUP=4, GP=16, D=d, HD=max(16, d // 2), G=64, BS=64, HAS8=False, HAS4=False, HAS2=False,
                HAS_MASK=args.mask, WINDOW=0, SOFTCAP=False, F32_DOTS=False, DEVICE_LENS=False, BOOK=False)
    jobs = [(src, name, chunk, warps) for src in sources for name in CONFIGS for chunk in _ints(args.chunks)
            for warps in _ints(args.warps)]
    rows = []
    for src, name, chunk, warps in tqdm(jobs, desc="builds"):
        constexprs = {**base, **CONFIGS[name], "CHUNK": chunk}
        rows.append({"source": src, "config": name, "chunk": chunk, "num_warps": warps, "arch": args.arch,
                     "mask": args.mask, **resource_usage(constexprs, args.arch, warps, sources[src], args.stages)})
    lines = ["| kernel | config | chunk | warps | registers | stack B | shared B | programs/SM (registers) | "
             "warp instructions per 64 tokens, each loop |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['source']} | {r['config']} | {r['chunk']} | {r['num_warps']} | {r['registers']} | "
              f"{r['stack_bytes']} | {r['shared_bytes']} | {r['programs_per_sm_by_registers']} | "
              f"{' / '.join(str(n * r['num_warps'] * 64 // r['chunk']) for n in r['loop_instructions'])} |"
              for r in rows]
    print("\n".join(lines))
    if args.out:
        from _common import environment

        args.out.mkdir(parents=True, exist_ok=True)
        env = environment("cpu", arch=f"sm_{args.arch}", kernel_sources={k: v.__file__ if v else "installed"
                                                                          for k, v in sources.items()})
        (args.out / "registers.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        (args.out / "registers.md").write_text(
            f"# Decode-kernel registers, built for sm_{args.arch} (no GPU)\n\nTriton {env.get('triton')}; command: "
            f"`{env['command']}`\n\n" + "\n".join(lines) + "\n")
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


if __name__ == "__main__":
    sys.exit(main())
