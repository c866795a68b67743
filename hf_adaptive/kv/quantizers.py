"""Quantizer backends: compute KIVI codes/scales/zeros in the packed layout of :mod:`hf_adaptive.kv.packed`.

Contract: every backend returns exactly what ``packed.quantize_keys`` / ``packed.quantize_values`` return
(same shapes, dtypes and ``x ≈ code * scale + zero`` convention), so the pools and the fused kernel never
know which backend produced a block. Dequantization is always ``packed.dequantize_*``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from hf_adaptive.kv import packed

QuantTriple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class KVQuantizer(Protocol):
    """A backend: keys per channel per block, values per token per group of channels."""

    name: str

    def quantize_keys(self, x: torch.Tensor, bits: int, block_size: int) -> QuantTriple: ...

    def quantize_values(self, x: torch.Tensor, bits: int, group: int) -> QuantTriple: ...


class TorchQuantizer:
    """Min-max asymmetric quantization (the reference functions of packed.py)."""

    name = "torch"

    def quantize_keys(self, x: torch.Tensor, bits: int, block_size: int) -> QuantTriple:
        return packed.quantize_keys(x, bits, block_size)

    def quantize_values(self, x: torch.Tensor, bits: int, group: int) -> QuantTriple:
        return packed.quantize_values(x, bits, group)


class HQQQuantizer:
    """HQQ (half-quadratic) optimized zero/scale, converted into the packed layout.

    hqq works on rows of ``group_size`` contiguous elements (``axis=1``), quantizes as
    ``q = round(x / s + z)`` and dequantizes as ``(q - z) * s`` with ``s`` the returned (already inverted)
    scale. Ours is ``x ≈ q * s + zero``, hence ``zero = -z * s``. Keys are grouped over the tokens of a
    block for each channel, so they are transposed to put those tokens contiguous first.
    """

    name = "hqq"

    def __init__(self, optimize: bool = True):
        try:
            from hqq.core.quantize import Quantizer
        except ImportError as err:  # hqq is optional on GPU machines
            raise ValueError("backend='hqq' needs the 'hqq' package, which is not importable here "
                             f"({err}). Fix: `pip install hqq` or use backend='torch'.") from err
        self._quantizer = Quantizer
        self.optimize = optimize

    def quantize_keys(self, x: torch.Tensor, bits: int, block_size: int) -> QuantTriple:
        packed.raise_if_bad_bits(bits)
        B, H, S, D = x.shape
        n = S // block_size
        rows = x.reshape(B, H, n, block_size, D).transpose(-1, -2).contiguous()  # (B, H, n, D, T)
        codes, scale, zero = self._rows(rows.reshape(-1, block_size), bits)
        codes = codes.view(B, H, n, D, block_size).transpose(-1, -2).reshape(B, H, S, D)
        return packed.pack_codes(codes, bits), scale.view(B, H, n, D), zero.view(B, H, n, D)

    def quantize_values(self, x: torch.Tensor, bits: int, group: int) -> QuantTriple:
        packed.raise_if_bad_bits(bits)
        B, H, S, D = x.shape
        codes, scale, zero = self._rows(x.reshape(-1, group), bits)
        codes = codes.view(B, H, S, D)
        return packed.pack_codes(codes, bits), scale.view(B, H, S, D // group), zero.view(B, H, S, D // group)

    def _rows(self, rows: torch.Tensor, bits: int) -> QuantTriple:
        """(R, G) rows -> uint8 codes (R, G), float16 scale and zero (R,) in our convention."""
        q, meta = self._quantizer.quantize(rows.float(), nbits=bits, channel_wise=True, group_size=rows.shape[1],
                                           optimize=self.optimize, axis=1, bitpack=False,
                                           compute_dtype=torch.float32, device=str(rows.device))
        scale = meta["scale"].float().reshape(-1)
        zero = (-meta["zero"].float().reshape(-1) * scale)
        # re-derive codes against the fp16-rounded scale/zero that will actually be stored
        scale16, zero16 = scale.to(packed.SCALE_DTYPE), zero.to(packed.SCALE_DTYPE)
        codes = ((rows.float() - zero16.float()[:, None]) / scale16.float()[:, None]).round_()
        codes = codes.clamp_(0, 2**bits - 1).to(torch.uint8)
        return codes, scale16, zero16


def make_quantizer(backend: str) -> KVQuantizer:
    """The backend named ``backend`` ("torch" or "hqq")."""
    if backend == "torch":
        return TorchQuantizer()
    if backend == "hqq":
        return HQQQuantizer()
    raise ValueError(f"backend must be one of ('torch', 'hqq'); got {backend!r}. Fix: backend='torch'.")
