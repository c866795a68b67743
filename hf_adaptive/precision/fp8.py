"""fp8 (e4m3) weights with per-row scales for ``torch._scaled_mm`` (Hopper / Ada, sm89+ only).

Contract: ``pack_fp8(weight)`` stores a (N, K) weight as e4m3 with one fp32 scale per output row;
``fp8_linear(x, w)`` quantizes the (M, K) activations per row inside the step (one amax reduction, no
host sync) and returns (M, N) bf16. ``_scaled_mm`` wants the weight operand column-major (K, N),
which ``w.t()`` of a row-major (N, K) tensor already is. K and N must be multiples of 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3_MAX = 448.0


@dataclass
class Fp8Weight:
    """An e4m3 weight (N, K) row-major and its per-row scales (1, N) fp32."""

    weight: torch.Tensor
    scale: torch.Tensor

    def nbytes(self) -> int:
        return self.weight.numel() + self.scale.numel() * 4

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``fp8_linear(x, self)``: the ``WeightFormat`` call."""
        return fp8_linear(x, self)


def fp8_supported(device: torch.device) -> bool:
    """True where ``_scaled_mm`` with e4m3 runs: CUDA compute capability >= 8.9."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def pack_fp8(weight: torch.Tensor) -> Fp8Weight:
    """Per-row symmetric e4m3 quantization of a (N, K) CUDA weight."""
    n, k = weight.shape
    if not fp8_supported(weight.device) or n % 16 or k % 16:
        raise ValueError(f"pack_fp8: needs a CUDA sm89+ device and N, K multiples of 16; got device "
                         f"{weight.device}, N={n}, K={k}. Drop 'fp8' from tiers= on this model/device")
    w = weight.float()
    scale = (w.abs().amax(-1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)  # (N, 1)
    return Fp8Weight((w / scale).to(torch.float8_e4m3fn), scale.t().contiguous())


def fp8_linear(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """(M, K) activations -> (M, N) bf16 through ``torch._scaled_mm`` with row-wise scales."""
    xf = x.float()
    x_scale = (xf.abs().amax(-1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)  # (M, 1)
    xq = (xf / x_scale).to(torch.float8_e4m3fn)
    return torch._scaled_mm(xq, w.weight.t(), scale_a=x_scale, scale_b=w.scale, out_dtype=torch.bfloat16)
