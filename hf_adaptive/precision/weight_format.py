"""What a precision tier's weight must offer a ``TieredLinear``: the seam between the tiers and the kernels.

Contract: a tier holds one ``WeightFormat`` per linear layer; ``TieredLinear`` only calls ``linear`` (its
forward) and ``nbytes`` (``PrecisionTiers.memory_bytes``), so a new format is a class with these two methods
and a branch in ``TieredLinear.add_format`` that packs it, never a new case in the forward. The int4 formats
also offer ``Int4Format``'s members, which the prepare-time kernel self-check reads. Implementations:
``DenseWeight`` (the fp32 and 16-bit tiers, here), ``int4.Int4Weight`` (tinygemm), ``int4_triton.TritonInt4Weight``
and ``fp8.Fp8Weight``. Structural typing: none of them inherits from these protocols.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class WeightFormat(Protocol):
    """A (N, K) linear weight held in one tier's format."""

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) activations -> (M, N), in the format's compute dtype (the caller casts back)."""
        ...

    def nbytes(self) -> int:
        """Bytes this copy of the weight holds (packed data, scales and zeros)."""
        ...


class Int4Format(WeightFormat, Protocol):
    """An int4 format, with what the prepare-time self-check compares its kernel against."""

    @property
    def kernel(self) -> str:
        """The kernel's name in messages (``"tinygemm"``, ``"Triton (<launch>)"``)."""
        ...

    @property
    def act_dtype(self) -> torch.dtype:
        """The dtype the kernel takes its activations in."""
        ...

    def reference_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The (N, K) fp32 matrix the kernel should compute with, given the original (N, K) ``weight``."""
        ...


@dataclass
class DenseWeight:
    """A plain (N, K) weight tensor (the fp32 and 16-bit tiers); may be the model's own parameter."""

    weight: torch.Tensor

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) in the weight's dtype."""
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()
