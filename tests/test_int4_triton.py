"""The Triton int4 weight-only matmul (the CUDA int4 tier's fast kernel), checked without a GPU.

The layout and dequantization are plain torch (CPU); the kernels run under Triton's CPU interpreter in a
subprocess (``TRITON_INTERPRET=1`` must be set before triton compiles anything) and are compiled to sm_90
cubins to catch compile-only errors; the timed tuning is GPU-only (``tests/test_precision_gpu.py``).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from helpers import run_under_triton_interpreter

from hf_adaptive.precision.int4 import dequantize_int4_reference
from hf_adaptive.precision.int4_triton import (
    GemvConfig,
    dequantize_triton_int4,
    gemv_candidates,
    pack_int4_triton,
    triton_group_size,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
# (N, K, group, rows, gemv launch): odd pair counts (N/2 = 45) leave a partial pair block; split K atomics
INTERPRETER_CASES = [(96, 256, 64, 1, GemvConfig(64, 32, 2, 4)), (90, 256, 128, 1, GemvConfig(64, 64, 1, 4)),
                     (96, 512, 128, 1, GemvConfig(128, 16, 4, 4)), (96, 256, 64, 3, GemvConfig()),
                     (64, 128, 32, 17, GemvConfig()),
                     # the code-dot kernel: one row, several rows, a partial pair block, K split over whole groups
                     (96, 256, 64, 1, GemvConfig(32, 32, 1, 4, dot=True)),
                     (90, 512, 128, 5, GemvConfig(32, 64, 2, 4, dot=True)),
                     (64, 256, 32, 16, GemvConfig(32, 32, 4, 2, dot=True))]


def test_pack_layout_matches_the_tinygemm_quantization():
    """Guards the byte layout: both int4 kernels must compute with the same weights (same codes, scales and
    zeros), so switching the kernel never changes the tier's numbers beyond bf16 scale rounding."""
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    packed = pack_int4_triton(w, 64, torch.float32, tune=False)
    assert packed.qweight.shape == (256, 48) and packed.qweight.dtype == torch.uint8
    torch.testing.assert_close(dequantize_triton_int4(packed), dequantize_int4_reference(w, 64), atol=1e-5, rtol=1e-5)
    assert packed.nbytes() == 256 * 48 + 2 * 4 * 96 * 4


def test_shape_limits_are_named():
    """Guards bad shapes: an odd N or a K no group size divides is refused with the fix in the message."""
    assert triton_group_size(256, 96) == 128 and triton_group_size(96, 96) == 32
    assert triton_group_size(256, 95) is None and triton_group_size(100, 96) is None
    with pytest.raises(ValueError, match="triton_group_size"):
        pack_int4_triton(torch.randn(95, 256), 128, tune=False)


def test_gemv_candidates_respect_the_tile_rules():
    """Guards the tuner's search space: every launch keeps a K tile inside one group, divides K, and leaves
    each split at least two tiles."""
    cands = gemv_candidates(4096, 128)
    gemv = [c for c in cands if not c.dot]
    assert gemv and all(c.block_k <= 128 and 4096 % (c.block_k * c.split_k) == 0 for c in gemv)
    assert all(4096 // (c.block_k * c.split_k) >= 2 for c in gemv)
    assert not [c for c in gemv_candidates(4096, 32) if c.block_k > 32]
    # code-dot launches: a tile divides the group (the scales apply per group), a split holds whole groups
    dot = [c for c in cands if c.dot]
    assert dot and all(128 % c.block_k == 0 and (4096 // 128) % c.split_k == 0 for c in dot)
    assert not [c for c in gemv_candidates(96 * 3, 96) if c.dot and 96 % c.block_k]


def run_case(n: int, k: int, g: int, rows: int, cfg: GemvConfig) -> dict:
    """One interpreter case: the kernel against x @ dequant(W).T in float32 (bf16 activations and output)."""
    from hf_adaptive.precision.int4_triton import _launch_code_dot, _launch_gemv, int4_triton_linear

    gen = torch.Generator().manual_seed(n + k + rows)
    packed = pack_int4_triton(torch.randn(n, k, generator=gen), g, torch.bfloat16, tune=False)
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    ref = x.float() @ dequantize_triton_int4(packed).T
    if cfg.dot:
        y = _launch_code_dot(x, packed.qweight, packed.scales, packed.zeros, g, cfg)
    elif rows > 1:
        y = int4_triton_linear(x, packed)
    else:
        y = _launch_gemv(x, packed.qweight, packed.scales, packed.zeros, g, cfg)
    y = y.float()
    return {"case": [n, k, g, rows, cfg.split_k, cfg.dot], "shape": list(y.shape),
            "rel_err": float((y - ref).abs().max() / ref.abs().max())}


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_kernels_under_triton_interpreter():
    """Guards the kernels' logic (pair layout, group scales, K splits with atomics, partial blocks, row
    masking of the tl.dot kernel) on machines without a GPU: the interpreter must match the reference."""
    results = run_under_triton_interpreter(__file__)
    assert len(results) == len(INTERPRETER_CASES)
    for res, (n, k, g, rows, cfg) in zip(results, INTERPRETER_CASES):
        assert res["shape"] == [rows, n], res
        assert res["rel_err"] < 0.01, res  # bf16 output rounding; a layout bug gives O(1)


if __name__ == "__main__":  # the interpreter run of test_kernels_under_triton_interpreter
    print(json.dumps([run_case(*c) for c in INTERPRETER_CASES]))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("kernel", ["gemv", "gemv_atomic", "mm", "code_dot", "code_dot_atomic"])
def test_kernels_compile_for_hopper(kernel):
    """Guards against compile-only failures the interpreter cannot see (dtype mismatches in the loop carry,
    constexpr misuse, tl.dot shapes): each kernel must compile to an sm_90 cubin without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_adaptive.precision import _int4_triton_kernels as kernels

    if kernel == "mm":
        fn = kernels.int4_mm_kernel
        const = dict(G=128, BLOCK_M=16, BLOCK_K=32, BLOCK_J=64, DOT_DT=triton.language.bfloat16)
    elif kernel.startswith("code_dot"):  # with the PTX code decode (the interpreter runs the arithmetic one)
        fn = kernels.int4_code_dot_kernel
        const = dict(G=128, BLOCK_M=16, BLOCK_K=64, BLOCK_J=64, ATOMIC=kernel.endswith("atomic"), ASM=True,
                     DOT_DT=triton.language.bfloat16)
    else:
        fn = kernels.int4_gemv_kernel
        const = dict(G=128, BLOCK_K=32, BLOCK_J=128, ATOMIC=kernel == "gemv_atomic")
    y_type = "*fp32" if kernel.endswith("atomic") else "*bf16"
    types = {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*bf16", "z_ptr": "*bf16", "y_ptr": y_type}
    sig = {name: "constexpr" if name in const else types.get(name, "i32") for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4})
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0


def test_prepare_tiers_int4_kernel_choice():
    """Guards the kernel switch: an unknown name is refused with the allowed ones, and CPU weights keep PyTorch's
    CPU int4 kernel whatever is asked (the Triton kernel is a CUDA path)."""
    from helpers import make_tiny_model

    from hf_adaptive.precision.int4 import Int4Weight
    from hf_adaptive.precision.tiers import prepare_tiers

    with pytest.raises(ValueError, match="int4_kernel must be one of"):
        prepare_tiers(make_tiny_model("llama"), tiers=("int4", "fp32"), int4_kernel="marlin")
    if HAS_TRITON:
        tiers = prepare_tiers(make_tiny_model("llama"), tiers=("int4", "fp32"), int4_kernel="triton")
        assert all(isinstance(m.formats["int4"], Int4Weight) for m in tiers.modules if "int4" in m.formats)


def test_tuner_reference_row_is_the_dequantized_product():
    """Guards the tuner's gate (each launch must match this before it is timed): the chunked reference equals
    x @ dequant(W).T of the whole matrix, across chunk edges and both nibbles."""
    from hf_adaptive.precision.int4_triton import _reference_row

    gen = torch.Generator().manual_seed(3)
    packed = pack_int4_triton(torch.randn(96, 256, generator=gen), 64, torch.float32, tune=False)
    x = torch.randn(1, 256, generator=gen)
    want = (x @ dequantize_triton_int4(packed).T)[0]
    got = _reference_row(x, packed.qweight, packed.scales, packed.zeros, 64, chunk=20)  # 48 pairs: a partial chunk
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_tinygemm_inner_k_tiles_are_checked():
    """Guards pack_int4's inner_k_tiles: a count tinygemm has no layout for, or one K does not fit, is refused with
    the allowed values."""
    from hf_adaptive.precision.int4 import pack_int4

    w = torch.randn(64, 256)
    with pytest.raises(ValueError, match="inner_k_tiles=3"):
        pack_int4(w, 64, torch.float32, inner_k_tiles=3)
    with pytest.raises(ValueError, match="inner_k_tiles=8"):
        pack_int4(torch.randn(64, 192), 64, torch.float32, inner_k_tiles=8)  # 192 % 128 != 0
    assert pack_int4(w, 64, torch.float32, inner_k_tiles=2).group_size == 64


def test_bench_int4_kernels_checks_its_tinygemm_packings(capsys):
    """Guards the benchmark's --tinygemm flag: GROUP:TILES pairs tinygemm cannot pack stop the run at parsing."""
    from helpers import load_eval_script

    bench = load_eval_script("bench_int4_kernels")
    assert bench.parse_args(["--out", "o", "--tinygemm", "64:8", "256:4"]).tinygemm == [(64, 8), (256, 4)]
    for bad in ("64", "48:8", "128:3"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--out", "o", "--tinygemm", bad])
        assert "--tinygemm" in capsys.readouterr().err
