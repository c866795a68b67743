"""Group-wise int4 weights with a Triton weight-only matmul tuned per shape (``prepare_tiers(int4_kernel="triton")``).

Why it was built: PyTorch's tinygemm (``int4.py``) reads its int4 bytes well under the copy bandwidth at one
activation row, which caps both the lossy tier's gain and verified mode's draft. This kernel streams a byte per
weight pair, coalesced along N, and is tuned per (N, K) once at pack time.

What it does (``eval/bench_int4_kernels.py``; numbers in the precision area of eval/results/README.md): at one row
the elementwise dequantize-and-FMA gemv is slower than tinygemm (ALU-bound, not byte-bound), so it is not the
default; at several rows its ``tl.dot`` kernel beats tinygemm on the large matrices. The code-dot kernel multiplies
the raw codes on tensor cores (decoded in PTX, about 1.5 instructions per code) and applies each group's scale and
zero after its dot; the tuner times it beside the gemv launches and keeps the fastest. With a code-dot launch, 1 to
16 rows take the same kernel.

Contract: ``pack_int4_triton(weight, group_size, act_dtype)`` quantizes a (N, K) weight exactly as ``int4.py``
does (same codes, scales and mid-point zeros, so both kernels compute with the same weights) and returns a
``TritonInt4Weight``; ``int4_triton_linear(x, w)`` computes ``x @ dequant(w).T`` for x (M, K) through the
custom op ``hf_adaptive::int4_triton_mm`` (opaque to ``torch.compile``; CUDA-graph capturable). One row runs
``int4_gemv_kernel`` or ``int4_code_dot_kernel`` (up to 16 rows) with the tuned (BLOCK_J, BLOCK_K, K splits, warps);
more rows run ``int4_mm_kernel``.

The module imports without triton (``HAS_TRITON`` is False) and does not import it until a kernel runs. Set
``TRITON_INTERPRET=1`` before that to run the kernels on CPU tensors through Triton's interpreter (tests); tuning
only happens on CUDA.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import logging
import os
from dataclasses import dataclass

import torch

from hf_adaptive.precision.int4 import GROUP_SIZES, quantize_groupwise

logger = logging.getLogger(__name__)

# The kernel is opt-in (prepare_tiers(int4_kernel="triton")): triton (~0.25 s to import) loads on first use only.
HAS_TRITON = importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _kernels():
    """The kernel module; triton reads TRITON_INTERPRET when it decorates them, i.e. here."""
    from hf_adaptive.precision import _int4_triton_kernels

    return _int4_triton_kernels


@functools.lru_cache(maxsize=None)
def _interpreting() -> bool:
    """Read once, like triton itself: the kernels are decorated for the interpreter or not, for the process."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class GemvConfig:
    """Launch of the one-row kernel: pairs per program, K rows per tile, K splits, warps, and which kernel
    (``dot``: the code-dot kernel, which also serves up to 16 rows; else the elementwise gemv)."""

    block_j: int = 64
    block_k: int = 32
    split_k: int = 1
    num_warps: int = 4
    dot: bool = False


@dataclass
class TritonInt4Weight:
    """A packed int4 weight: ``qweight`` (K, N/2) uint8, ``scales`` / ``zeros`` (K/g, N), g, the tuned launch."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor  # zero - 8 * scale, so a weight is code * scale + zeros
    out_features: int
    in_features: int
    group_size: int
    gemv: GemvConfig

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``int4_triton_linear(x, self)``: the ``WeightFormat`` call."""
        return int4_triton_linear(x, self)

    @property
    def kernel(self) -> str:
        return f"Triton ({self.gemv})"

    @property
    def act_dtype(self) -> torch.dtype:
        return self.scales.dtype

    def reference_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """Unpacked from this weight's own codes (``weight``, the original, is not needed)."""
        return dequantize_triton_int4(self)


def triton_group_size(in_features: int, out_features: int, preferred: int = 128) -> int | None:
    """Largest group size <= ``preferred`` this layout accepts (K divisible, N even), else None."""
    if out_features % 2:
        return None
    return next((g for g in sorted(GROUP_SIZES, reverse=True) if g <= preferred and in_features % g == 0), None)


def pack_int4_triton(weight: torch.Tensor, group_size: int, act_dtype: torch.dtype = torch.bfloat16,
                     tune: bool = True) -> TritonInt4Weight:
    """Quantize and pack a (N, K) weight for ``int4_triton_linear`` (on CUDA, also pick the fastest launch).

    Args:
        weight: (N, K) float weight on its final device.
        group_size: from ``triton_group_size``.
        act_dtype: dtype of the activations and of the output (scales are stored in it).
        tune: time the one-row launches for this shape on CUDA (cached per shape and card).
    """
    n, k = weight.shape
    if triton_group_size(k, n, group_size) != group_size:
        raise ValueError(f"pack_int4_triton: weight (N={n}, K={k}) does not fit group_size={group_size}; "
                         f"use triton_group_size(K, N) (N even, K divisible by one of {GROUP_SIZES})")
    codes, scale, zero = quantize_groupwise(weight, group_size)
    half = n // 2
    qweight = (codes[:half] | (codes[half:] << 4)).T.contiguous().to(torch.uint8)  # (K, N/2)
    packed = TritonInt4Weight(qweight, scale.T.contiguous().to(act_dtype),
                              (zero - 8 * scale).T.contiguous().to(act_dtype), n, k, group_size, GemvConfig())
    if tune and weight.is_cuda and HAS_TRITON and not _interpreting():
        packed.gemv = tuned_launch(n, k, group_size, act_dtype, weight.device.index or 0)
    return packed


def dequantize_triton_int4(w: TritonInt4Weight) -> torch.Tensor:
    """The (N, K) float32 matrix the kernels compute with (for tests and the prepare-time self-check)."""
    q = w.qweight.to(torch.int32)
    codes = torch.cat([q & 15, q >> 4], dim=1).T.float()  # (N, K)
    rep = functools.partial(torch.repeat_interleave, repeats=w.group_size, dim=1)
    return codes * rep(w.scales.T.float()) + rep(w.zeros.T.float())


def int4_triton_linear(x: torch.Tensor, w: TritonInt4Weight) -> torch.Tensor:
    """(M, K) activations times the packed weight -> (M, N) in the scales' dtype."""
    g = w.gemv
    return torch.ops.hf_adaptive.int4_triton_mm(x.to(w.scales.dtype).contiguous(), w.qweight, w.scales, w.zeros,
                                                w.group_size, g.block_j, g.block_k, g.split_k, g.num_warps, g.dot)


@torch.library.custom_op("hf_adaptive::int4_triton_mm", mutates_args=())
def int4_triton_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int, block_j: int, block_k: int, split_k: int, num_warps: int,
                   dot: bool = False) -> torch.Tensor:
    """(M, K) @ int4 weight -> (M, N); see the module docstring for the layout."""
    if not HAS_TRITON:
        raise RuntimeError("int4_triton_mm needs triton (pip install triton); or prepare the int4 tier with "
                           "int4_kernel='tinygemm'")
    m, k = x.shape
    n_half = qweight.shape[1]
    cfg = GemvConfig(block_j, block_k, split_k, num_warps, dot)
    if dot and m <= DOT_ROWS:
        return _launch_code_dot(x, qweight, scales, zeros, group_size, cfg)
    if m == 1:
        return _launch_gemv(x, qweight, scales, zeros, group_size, cfg)
    y = torch.empty(m, 2 * n_half, dtype=x.dtype, device=x.device)
    bk = min(group_size, 32)
    kernels, interpreting = _kernels(), _interpreting()
    grid = (_cdiv(n_half, 64), _cdiv(m, 16))
    kernels.int4_mm_kernel[grid](x, qweight, scales, zeros, y, m, n_half, k // bk, x.stride(0), y.stride(0),
                                 qweight.stride(0), scales.stride(0), G=group_size, BLOCK_M=16, BLOCK_K=bk,
                                 BLOCK_J=64, DOT_DT=kernels.tl.float32 if interpreting else kernels.tl.bfloat16,
                                 num_warps=4)
    return y


@int4_triton_mm.register_fake
def _int4_triton_mm_fake(x, qweight, scales, zeros, *args) -> torch.Tensor:
    return x.new_empty(x.shape[0], 2 * qweight.shape[1])


def _launch_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, cfg: GemvConfig) -> torch.Tensor:
    k, n_half = qweight.shape
    iters = k // (cfg.block_k * cfg.split_k)
    atomic = cfg.split_k > 1
    y = (torch.zeros if atomic else torch.empty)(1, 2 * n_half, dtype=torch.float32 if atomic else x.dtype,
                                                 device=x.device)
    grid = (_cdiv(n_half, cfg.block_j), cfg.split_k)
    _kernels().int4_gemv_kernel[grid](x, qweight, scales, zeros, y, n_half, iters, qweight.stride(0),
                                      scales.stride(0), G=group_size, BLOCK_K=cfg.block_k, BLOCK_J=cfg.block_j,
                                      ATOMIC=atomic, num_warps=cfg.num_warps)
    return y.to(x.dtype) if atomic else y


def _launch_code_dot(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int, cfg: GemvConfig) -> torch.Tensor:
    m = x.shape[0]
    k, n_half = qweight.shape
    atomic = cfg.split_k > 1
    y = (torch.zeros if atomic else torch.empty)(m, 2 * n_half, dtype=torch.float32 if atomic else x.dtype,
                                                 device=x.device)
    kernels, interpreting = _kernels(), _interpreting()
    grid = (_cdiv(n_half, cfg.block_j), cfg.split_k)
    kernels.int4_code_dot_kernel[grid](
        x, qweight, scales, zeros, y, m, n_half, k // group_size // cfg.split_k, x.stride(0), y.stride(0),
        qweight.stride(0), scales.stride(0), G=group_size, BLOCK_M=DOT_ROWS, BLOCK_K=cfg.block_k,
        BLOCK_J=cfg.block_j, ATOMIC=atomic, ASM=not interpreting,
        DOT_DT=kernels.tl.float32 if interpreting else kernels.tl.bfloat16, num_warps=cfg.num_warps)
    return y.to(x.dtype) if atomic else y


DOT_ROWS = 16  # rows of the code-dot kernel's tensor-core tile: it serves 1 to 16 activation rows


def gemv_candidates(k: int, group_size: int) -> list[GemvConfig]:
    """Launches worth timing for K: tiles inside one group, K splits that divide the tile count (elementwise
    gemv), or the group count (code-dot kernel: a split holds whole groups)."""
    out = []
    for bj, bk, warps in itertools.product((64, 128, 256), (16, 32, 64), (4, 8)):
        if bk > group_size or k % bk or bj * bk > 2048 * warps:  # two fp32 (BLOCK_K, BLOCK_J) accumulators
            continue
        tiles = k // bk
        out += [GemvConfig(bj, bk, s, warps) for s in (1, 2, 4, 8, 16) if tiles % s == 0 and tiles // s >= 2]
    groups = k // group_size
    for bj, bk, warps in itertools.product((32, 64, 128), (32, 64), (2, 4, 8)):
        if bk > group_size or group_size % bk or bj * bk > 2048 * warps:  # two (BLOCK_K, BLOCK_J) code tiles
            continue
        out += [GemvConfig(bj, bk, s, warps, dot=True) for s in (1, 2, 4, 8, 16) if groups % s == 0]
    return out


def _reference_row(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group_size: int,
                   chunk: int = 4096) -> torch.Tensor:
    """x (1, K) times the dequantized weight, (N,) float32, ``chunk`` byte columns at a time (no (N, K) float copy
    of a large matrix: the tuner checks every launch against it)."""
    k, n_half = q.shape
    row, out = x.float()[0], torch.empty(2 * n_half, device=x.device)
    for j in range(0, n_half, chunk):
        pairs = q[:, j:j + chunk].to(torch.int32)  # (K, c)
        for half, codes in ((0, pairs & 15), (1, pairs >> 4)):
            cols = slice(half * n_half + j, half * n_half + j + pairs.shape[1])
            w = (codes.float() * s[:, cols].float().repeat_interleave(group_size, 0)
                 + z[:, cols].float().repeat_interleave(group_size, 0))  # (K, c)
            out[cols] = row @ w
    return out


@functools.lru_cache(maxsize=None)
def tuned_launch(n: int, k: int, group_size: int, dtype: torch.dtype, device_index: int,
                 dot: bool | None = None) -> GemvConfig:
    """The fastest ``gemv_candidates`` launch for this shape on this card at one row (timed once per process);
    ``dot``: only the code-dot launches (True) or only the elementwise ones (False); None: both. A launch whose
    result disagrees with the dequantized reference (beyond 1 % of its largest value) is left out, with a warning."""
    import triton.testing
    device = torch.device("cuda", device_index)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randint(0, 256, (k, n // 2), dtype=torch.uint8, device=device, generator=gen)
    s = torch.rand(k // group_size, n, device=device, generator=gen).to(dtype) * 0.01
    z = -8 * s
    x = torch.randn(1, k, device=device, generator=gen).to(dtype)
    ref = _reference_row(x, q, s, z, group_size)
    timings = {}
    for cfg in gemv_candidates(k, group_size):
        if dot is not None and cfg.dot != dot:
            continue
        launch = _launch_code_dot if cfg.dot else _launch_gemv
        try:
            y = launch(x, q, s, z, group_size, cfg)[0].float()
            if not float((y - ref).abs().max()) <= 1e-2 * float(ref.abs().max()):  # only launches that compute W
                logger.warning("int4 gemv config %s disagrees with the reference for N=%d K=%d; not used", cfg, n, k)
                continue
            timings[cfg] = triton.testing.do_bench(lambda cfg=cfg, launch=launch: launch(x, q, s, z, group_size, cfg),
                                                   warmup=3, rep=10)
        except Exception as exc:  # a launch this card cannot run (registers, shared memory): skip it
            logger.debug("int4 gemv config %s failed: %s", cfg, exc)
    if not timings:
        raise RuntimeError(f"int4_triton: no launch ran for N={n}, K={k}; use int4_kernel='tinygemm'")
    best = min(timings, key=timings.get)
    logger.info("int4 gemv N=%d K=%d: %s %.1f us", n, k, best, 1e3 * timings[best])
    return best
