"""Group-wise asymmetric int4 weights for PyTorch's tinygemm kernels (CUDA) and their CPU twins.

Contract: ``pack_int4(weight, group_size)`` quantizes a (N, K) weight once and returns an ``Int4Weight``;
``int4_linear(x, w)`` computes ``x @ dequant(w).T`` for x of shape (M, K) with the fast kernel of the
weight's device:

- CUDA: ``aten._convert_weight_to_int4pack`` takes (N, K/2) uint8 (two nibbles per byte, the even
  column in the high nibble; a one-time probe confirms the order) and ``aten._weight_int4pack_mm``
  needs bf16 activations;
- CPU: ``aten._convert_weight_to_int4pack_for_cpu`` takes (N, K) int32 values in [0, 15] and
  ``aten._weight_int4pack_mm_for_cpu`` accepts fp32/bf16/fp16 activations.

Both dequantize as ``(q - 8) * scale + zero`` per group of ``group_size`` input columns; scales and
zeros travel together as (K / group_size, N, 2). Kernel limits: group size in {32, 64, 128, 256},
K divisible by the group size and by 16 * inner_k_tiles (inner_k_tiles in {2, 4, 8}), N divisible by 8 on CUDA
and by 16 on CPU (``out_multiple``); a vocabulary of 49160 rows passes the first and fails the second.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

GROUP_SIZES = (32, 64, 128, 256)
INNER_K_TILES = (8, 4, 2)
OUT_MULTIPLE = {"cuda": 8, "cpu": 16}  # N (rows) the packer takes, per device type


@dataclass
class Int4Weight:
    """A packed int4 weight: ``packed`` (kernel layout), ``scales_zeros`` (K/g, N, 2), shapes and g."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor
    out_features: int
    in_features: int
    group_size: int

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + \
            self.scales_zeros.numel() * self.scales_zeros.element_size()

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``int4_linear(x, self)``: the ``WeightFormat`` call."""
        return int4_linear(x, self)

    @property
    def kernel(self) -> str:
        return "tinygemm"

    @property
    def act_dtype(self) -> torch.dtype:
        return self.scales_zeros.dtype

    def reference_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The packed layout is the kernel's own, so the reference re-quantizes the original ``weight``."""
        return dequantize_int4_reference(weight, self.group_size)


def choose_group_size(in_features: int, out_features: int, preferred: int = 128,
                      out_multiple: int = OUT_MULTIPLE["cuda"]) -> int | None:
    """Largest supported group size <= ``preferred`` that the kernel accepts for this shape, else None.
    ``out_multiple``: what N must divide by on the weight's device (``OUT_MULTIPLE``)."""
    if out_features % out_multiple:
        return None
    for g in sorted((g for g in GROUP_SIZES if g <= preferred), reverse=True):
        if in_features % g == 0 and _inner_k_tiles(in_features) is not None:
            return g
    return None


def _inner_k_tiles(in_features: int) -> int | None:
    return next((t for t in INNER_K_TILES if in_features % (16 * t) == 0), None)


def quantize_groupwise(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> int32 codes (N, K) in [0, 15], scale and zero (N, K/g) fp32 (zero is mid-point)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    codes = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    zero = lo + 8 * scale  # tinygemm dequantizes (q - 8) * scale + zero
    return codes.reshape(n, k), scale, zero


def pack_int4(weight: torch.Tensor, group_size: int, act_dtype: torch.dtype,
              inner_k_tiles: int | None = None) -> Int4Weight:
    """Quantize and pack a (N, K) weight for ``int4_linear`` on the weight's device.

    Args:
        weight: (N, K) float weight (N = out_features).
        group_size: from ``choose_group_size``.
        act_dtype: dtype of activations at run time (forced to bf16 on CUDA, tinygemm's only dtype).
        inner_k_tiles: tinygemm's K tiles per packed block, one of ``INNER_K_TILES`` (None: the largest that
            divides K / 16).
    """
    n, k = weight.shape
    tiles = _inner_k_tiles(k) if inner_k_tiles is None else inner_k_tiles
    if tiles is not None and (tiles not in INNER_K_TILES or k % (16 * tiles)):
        raise ValueError(f"pack_int4: inner_k_tiles={inner_k_tiles} does not fit K={k}; use one of "
                         f"{INNER_K_TILES} with K % (16 * inner_k_tiles) == 0, or None")
    multiple = out_multiple_for(weight.device)
    if choose_group_size(k, n, group_size, multiple) != group_size or tiles is None:
        raise ValueError(f"pack_int4: weight (N={n}, K={k}) does not fit group_size={group_size}; use "
                         f"choose_group_size(K, N, out_multiple={multiple}) (allowed {GROUP_SIZES}, "
                         f"K % (16*{INNER_K_TILES}) == 0, N % {multiple} == 0 on {weight.device.type})")
    codes, scale, zero = quantize_groupwise(weight, group_size)
    if weight.is_cuda:
        act_dtype = torch.bfloat16
        packed = _pack_cuda(codes, tiles, _cuda_even_nibble_high(weight.device.index or 0))
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), tiles)
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(act_dtype)
    return Int4Weight(packed, scales_zeros, n, k, group_size)


def out_multiple_for(device: torch.device) -> int:
    """What the packer on ``device`` needs N to divide by (``OUT_MULTIPLE``; CPU's rule for other devices)."""
    return OUT_MULTIPLE.get(device.type, OUT_MULTIPLE["cpu"])


def _pack_cuda(codes: torch.Tensor, tiles: int, even_high: bool) -> torch.Tensor:
    even, odd = codes[:, ::2], codes[:, 1::2]
    nibbles = (even << 4 | odd) if even_high else (odd << 4 | even)
    return torch.ops.aten._convert_weight_to_int4pack(nibbles.to(torch.uint8).contiguous(), tiles)


@functools.lru_cache(maxsize=None)
def _cuda_even_nibble_high(device_index: int) -> bool:
    """Which nibble holds the even column for this torch build's CUDA packer, found once by a probe
    against the dequantized reference (torch 2.5+ documents high; the probe guards against changes)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen).to(f"cuda:{device_index}")
    x = torch.randn(4, 256, generator=gen).to(w.device, torch.bfloat16)
    ref = x.float() @ dequantize_int4_reference(w, 128).T
    codes, scale, zero = quantize_groupwise(w, 128)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    for even_high in (True, False):
        y = torch.ops.aten._weight_int4pack_mm(x, _pack_cuda(codes, 8, even_high), 128, sz).float()
        if ((y - ref).abs().max() / ref.abs().max()).item() < 0.02:  # once per process and device
            return even_high
    raise RuntimeError(f"int4: neither nibble order matches the reference on torch {torch.__version__}; "
                       "drop 'int4' from prepare_tiers(tiers=...) and report it")


def int4_linear(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """(M, K) activations times the packed weight -> (M, N) in the scales' dtype."""
    x = x.to(w.scales_zeros.dtype).contiguous()
    if x.is_cuda:
        return torch.ops.aten._weight_int4pack_mm(x, w.packed, w.group_size, w.scales_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, w.group_size, w.scales_zeros)


def dequantize_int4_reference(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """What the kernels compute with, as a plain (N, K) fp32 matrix (for tests and self-checks)."""
    codes, scale, zero = quantize_groupwise(weight, group_size)
    n, k = weight.shape
    g = codes.reshape(n, k // group_size, group_size).float()
    return ((g - 8) * scale[..., None] + zero[..., None]).reshape(n, k)
