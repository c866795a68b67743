"""Growable per-precision block pools: the storage behind one layer's block table.

Contract: a :class:`BlockPool` owns the tensors of every block held at one precision (16 = model dtype, or
8/4/2-bit KIVI codes with float16 scales/zeros, laid out as in :mod:`hf_adaptive.kv.packed`). It hands out
slots, writes/reads whole blocks, grows geometrically and compacts when mostly empty. It knows nothing
about logical order (that is the block table, kept by the layer) nor about pressure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from hf_adaptive.kv import packed

GROWTH_FACTOR = 1.5


def to_device(cpu_tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host index tensor -> ``device`` without a host sync (pinned + non-blocking on CUDA)."""
    if device.type != "cuda":
        return cpu_tensor.to(device)
    return cpu_tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class PoolShape:
    """Geometry shared by all pools of a layer: batch, kv heads, head dim, value group, tokens per block."""

    batch: int
    heads: int
    head_dim: int
    value_group: int
    block_size: int
    dtype: torch.dtype
    device: torch.device


def _tensor_specs(bits: int, shape: PoolShape) -> dict[str, tuple[int, int, torch.dtype]]:
    """name -> (rows per slot, last dim, dtype) of every tensor a pool at ``bits`` holds."""
    D, T = shape.head_dim, shape.block_size
    if bits == 16:
        return {"k": (T, D, shape.dtype), "v": (T, D, shape.dtype)}
    code_dim, groups, f16 = D * bits // 8, D // shape.value_group, packed.SCALE_DTYPE
    return {"k_codes": (T, code_dim, torch.uint8), "k_scale": (1, D, f16), "k_zero": (1, D, f16),
            "v_codes": (T, code_dim, torch.uint8), "v_scale": (T, groups, f16), "v_zero": (T, groups, f16)}


class BlockPool:
    """All blocks of one layer stored at ``bits``; slots are reused after being freed."""

    def __init__(self, bits: int, shape: PoolShape):
        self.bits, self.shape = bits, shape
        self.specs = _tensor_specs(bits, shape)
        self.capacity = 0
        self.free: list[int] = []
        self.used = 0
        self.tensors: dict[str, torch.Tensor] = {name: self._zeros(name, 0) for name in self.specs}
        self._slot_bytes = self._compute_slot_bytes()

    def _zeros(self, name: str, slots: int) -> torch.Tensor:
        rows, last, dtype = self.specs[name]
        s = self.shape
        return torch.zeros(s.batch, s.heads, slots * rows, last, dtype=dtype, device=s.device)

    @property
    def high_water(self) -> int:
        """One past the highest slot that may be in use (the prefix the kernel must see)."""
        free, top = set(self.free), self.capacity
        while top > 0 and top - 1 in free:
            top -= 1
        return top

    def alloc(self, n: int) -> list[int]:
        """Reserve ``n`` slots (lowest free first), growing the tensors if needed."""
        if len(self.free) < n:
            self._grow(max(self.capacity + n - len(self.free), math.ceil(self.capacity * GROWTH_FACTOR), 4))
        self.free.sort()
        slots, self.free = self.free[:n], self.free[n:]
        self.used += n
        return slots

    def reserve(self, slots: int) -> None:
        """Grow to at least ``slots`` slots now (a static cache allocates its pools at their capacity up front)."""
        if slots > self.capacity:
            self._grow(slots)

    def release(self, slots: list[int]) -> None:
        """Give slots back (their data stays until overwritten)."""
        self.free.extend(slots)
        self.used -= len(slots)

    def _grow(self, new_capacity: int) -> None:
        for name, old in self.tensors.items():
            new = self._zeros(name, new_capacity)
            new[:, :, : old.shape[2]] = old
            self.tensors[name] = new
        self.free.extend(range(self.capacity, new_capacity))
        self.capacity = new_capacity

    def row_index(self, slots: list[int], name: str) -> torch.Tensor:
        """Row indices (along dim 2) of ``slots`` in tensor ``name``, block after block."""
        rows = self.specs[name][0]
        base = torch.tensor(slots, dtype=torch.long).mul_(rows).unsqueeze(1)
        return to_device((base + torch.arange(rows)).flatten(), self.shape.device)

    def write(self, slots: list[int], data: dict[str, torch.Tensor]) -> None:
        """Store whole blocks: ``data[name]`` is (B, H, len(slots) * rows_per_slot, last) in slot order."""
        for name, tensor in self.tensors.items():
            tensor.index_copy_(2, self.row_index(slots, name), data[name].to(tensor.dtype))

    def read(self, slots: list[int]) -> dict[str, torch.Tensor]:
        """The raw tensors of ``slots`` (codes/scales/zeros, or k/v for 16 bits), block after block."""
        return {name: t.index_select(2, self.row_index(slots, name)) for name, t in self.tensors.items()}

    def dequantize(self, data: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw block tensors (as from :meth:`read` or a prefix view) -> keys, values (B, H, n * T, D)."""
        if self.bits == 16:
            return data["k"].to(dtype), data["v"].to(dtype)
        s = self.shape
        k = packed.dequantize_keys(data["k_codes"], data["k_scale"], data["k_zero"], self.bits, s.block_size, dtype)
        v = packed.dequantize_values(data["v_codes"], data["v_scale"], data["v_zero"], self.bits,
                                     s.value_group, dtype)
        return k, v

    def prefix(self, slots: int) -> dict[str, torch.Tensor]:
        """Views of the first ``slots`` slots of every tensor (no copy)."""
        return {name: t[:, :, : slots * self.specs[name][0]] for name, t in self.tensors.items()}

    def live_bytes(self) -> int:
        """Bytes of the slots in use (codes, scales and zeros included)."""
        return self.used * self.slot_bytes()

    def reserved_bytes(self) -> int:
        """Bytes allocated, free slots included."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def slot_bytes(self) -> int:
        """Bytes of one slot: every tensor's rows for one block, all batch rows and heads."""
        return self._slot_bytes

    def _compute_slot_bytes(self) -> int:
        s = self.shape
        return sum(rows * last * s.batch * s.heads * torch.empty((), dtype=dt).element_size()
                   for rows, last, dt in self.specs.values())

    def compact(self) -> dict[int, int]:
        """Move used slots to the front and shrink the tensors; returns {old slot: new slot}."""
        free = set(self.free)
        kept = [slot for slot in range(self.capacity) if slot not in free]
        data = self.read(kept) if kept else None
        self.tensors = {name: self._zeros(name, len(kept)) for name in self.specs}
        self.capacity, self.free = len(kept), []
        if data is not None:
            self.write(list(range(len(kept))), data)
        return {old: new for new, old in enumerate(kept)}

    def apply_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-dimension op (reorder/select/repeat) to every tensor."""
        self.tensors = {name: fn(t) for name, t in self.tensors.items()}
        first = next(iter(self.tensors.values()))
        self.shape = replace(self.shape, batch=first.shape[0])
        self._slot_bytes = self._compute_slot_bytes()

    def as_quant_pool(self, slots: int) -> packed.QuantPool:
        """The packed-layout view of the first ``slots`` slots (quantized pools only)."""
        view = self.prefix(slots)
        return packed.QuantPool(self.bits, view["k_codes"], view["k_scale"], view["k_zero"],
                                view["v_codes"], view["v_scale"], view["v_zero"])

    def record_stream(self, stream) -> None:
        """Keep every tensor alive until work queued on ``stream`` is done (CUDA side-stream use)."""
        for t in self.tensors.values():
            t.record_stream(stream)
