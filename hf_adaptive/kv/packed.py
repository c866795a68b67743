"""The packed KV layout: the contract between the cache's storage and the attention kernels.

Knows nothing about transformers or about pressure. One full-attention layer's keys/values, in logical
token order, are

    [history block 0][history block 1] ... [history block N-1][exact tail]

Each history block holds ``block_size`` consecutive tokens at one precision (16 = the model's dtype,
or 8/4/2-bit codes). The exact tail holds the most recent tokens in the model's dtype. A block's data
lives in the pool of its precision, at rows ``[slot * block_size, (slot + 1) * block_size)``; the block
table (``block_bits``, ``block_slot``) maps logical block i to its pool and slot, so blocks can change
precision (demotion) without moving the others, and freed slots are reused (paged-attention style).

Quantization is asymmetric, ``x ≈ code * scale + zero`` with unsigned codes in ``[0, 2**bits - 1]``:
- keys per channel (KIVI): one (scale, zero) per (block, channel): shape (B, H, n_slots, D);
- values per token, in groups of ``value_group`` channels: shape (B, H, n_slots * block_size, D // G).
Codes are packed along the channel axis in split planes: a row of D channels at ``bits`` is D * bits / 8 bytes,
and field k (low bits first) of byte j holds channel ``j + k * D * bits / 8``. For 4 bits
``byte[j] = c[j] | c[j + D/2] << 4``; for 2 bits ``byte[j] = c[j] | c[j + D/4] << 2 | c[j + D/2] << 4 |
c[j + 3D/4] << 6``. Each field plane is then a contiguous run of channels, so the decode kernel unpacks half a
head dim with one shift and one mask, without interleaving fields back into channel order.
Scales and zeros are float16 (2 bytes each in the byte accounting).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

QUANT_BITS = (8, 4, 2)
SCALE_DTYPE = torch.float16
_PACKED_ATTR = "_hf_adaptive_packed_view"


@dataclass
class QuantPool:
    """Storage for all blocks of one layer held at ``bits`` < 16.

    Shapes (B batch, H kv heads, D head dim, S = n_slots * block_size rows, G value group):
        k_codes: uint8 (B, H, S, D * bits // 8)
        k_scale, k_zero: float16 (B, H, n_slots, D)
        v_codes: uint8 (B, H, S, D * bits // 8)
        v_scale, v_zero: float16 (B, H, S, D // G)
    """

    bits: int
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor

    def nbytes(self, used_slots: int, block_size: int) -> int:
        """Bytes held by ``used_slots`` slots (codes, scales and zeros of keys and values)."""
        per_row = self.k_codes[..., :1, :].numel() + self.v_codes[..., :1, :].numel()
        per_row += (self.v_scale[..., :1, :].numel() + self.v_zero[..., :1, :].numel()) * 2
        per_slot = (self.k_scale[..., :1, :].numel() + self.k_zero[..., :1, :].numel()) * 2
        return used_slots * (block_size * per_row + per_slot)


@dataclass
class PackedKV:
    """A read-only view of one layer's cache in the packed layout (see module docstring).

    Attributes:
        block_size: tokens per history block.
        value_group: channels per value quantization group.
        block_bits: int32 (N,) precision of each logical history block (16, 8, 4 or 2); int64 in a static view,
            whose table lives in its address book.
        block_slot: int32 (N,) slot of each logical block inside the pool of its precision (int64 likewise).
        full_k, full_v: (B, H, S16, D) model dtype, the pool of 16-bit history blocks.
        pools: {bits: QuantPool} for each quantized precision present.
        tail_k, tail_v: (B, H, T, D) model dtype, the exact most recent tokens.
        lengths: None for a view whose shapes are its extents (the dynamic cache). For a static view (the
            compile-friendly cache, read under CUDA graphs): an int32 (2,) device tensor [history blocks,
            tail tokens]; ``block_bits``/``block_slot``, the tail and the pools are then capacity-sized and
            only these leading extents are live.
        max_tokens: static views only: the cache's max length (the key length of transformers' masks).
        book: static views only, optional: the device address book of the history storage (see
            :class:`PoolBook`). A reader that takes it reads ``full_k``/``full_v`` and the pools through it.
    """

    block_size: int
    value_group: int
    block_bits: torch.Tensor
    block_slot: torch.Tensor
    full_k: torch.Tensor
    full_v: torch.Tensor
    tail_k: torch.Tensor
    tail_v: torch.Tensor
    pools: dict[int, QuantPool] = field(default_factory=dict)
    lengths: torch.Tensor | None = None
    max_tokens: int = 0
    book: PoolBook | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens in the layer; for a static view, ``max_tokens`` (the key length of its masks)."""
        if self.lengths is not None:
            return self.max_tokens
        return int(self.block_bits.numel()) * self.block_size + self.tail_k.shape[-2]


# Address book layout (int64 entries): the 16-bit pool, then each precision of QUANT_BITS in that order.
BOOK_FULL = ("full_k", "full_v", "row_stride_b", "row_stride_h", "row_stride_row")
BOOK_QUANT = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero",
              "codes_stride_b", "codes_stride_h", "k_scale_stride_b", "k_scale_stride_h", "v_scale_stride_b",
              "v_scale_stride_h")
BOOK_SIZE = len(BOOK_FULL) + len(BOOK_QUANT) * len(QUANT_BITS)
# The block table after the header: four rows of ``blocks`` entries, then the group starts. Rows 0-1 are in logical
# order (each block's precision and slot); rows 2-3 list the same blocks grouped by precision, in the order of
# BOOK_GROUPS (slot, logical index), so the kernel walks each precision in a loop without branches (attention
# sums over keys in any order); the starts give each group's first entry and, last, the number of blocks.
BOOK_GROUPS = (16, *QUANT_BITS)
BOOK_TABLE_ROWS = 4


def book_length(blocks: int) -> int:
    """Entries of an address book whose block table holds ``blocks`` blocks."""
    return BOOK_SIZE + BOOK_TABLE_ROWS * blocks + len(BOOK_GROUPS) + 1


def book_table(block_bits: list[int], block_slot: list[int]) -> tuple[list[list[int]], list[int]]:
    """The block-table rows of an address book (each as long as the table) and the group starts.

    Returns ``([bits, slots, grouped slots, grouped logical indices], starts)``: ``starts[g]`` is the first grouped
    entry of precision ``BOOK_GROUPS[g]`` and ``starts[-1]`` the number of blocks.
    """
    if len(block_bits) != len(block_slot):
        raise ValueError(f"block_bits and block_slot must be equally long; got {len(block_bits)} and {len(block_slot)}.")
    unknown = set(block_bits) - set(BOOK_GROUPS)
    if unknown:
        raise ValueError(f"block precisions {sorted(unknown)} are not among {BOOK_GROUPS}.")
    order = sorted(range(len(block_bits)), key=lambda i: BOOK_GROUPS.index(block_bits[i]))  # stable: logical order
    starts, first = [], 0
    for bits in BOOK_GROUPS:
        starts.append(first)
        first += block_bits.count(bits)
    starts.append(first)
    rows = [list(block_bits), list(block_slot), [block_slot[i] for i in order], order]
    return rows, starts


def book_offset(bits: int) -> int:
    """First entry of precision ``bits`` in an address book (0 for the 16-bit pool)."""
    return 0 if bits == 16 else len(BOOK_FULL) + len(BOOK_QUANT) * QUANT_BITS.index(bits)


@dataclass(frozen=True)
class PoolBook:
    """The history storage of a static view as one small device tensor of addresses and strides.

    A static cache replaces a pool when it creates, grows or releases one. Read as tensors, every replacement
    would change the inputs of the compiled decode step (new guards, a new CUDA-graph capture). Read through the
    book, the step sees one fixed int64 tensor whose entries the host rewrites (eagerly, between steps) when
    storage moves; the kernel loads the addresses at run time.

    The block table travels in the same tensor, so a layer's whole history is one input of the step.

    Attributes:
        entries: int64 (:func:`book_length` ``(blocks)``,) on the storage's device: first the data pointers and
            element strides (:func:`book_entries`: ``BOOK_FULL`` then ``BOOK_QUANT`` per precision of
            ``QUANT_BITS``, see :func:`book_offset`), then the block table (:func:`book_table`): ``blocks``
            precisions, ``blocks`` slots, ``blocks`` slots grouped by precision, their ``blocks`` logical indices,
            and the ``len(BOOK_GROUPS) + 1`` group starts.
        bits: the quantized precisions whose entries point at real storage (a pool or a placeholder).
        blocks: capacity of the block table (the live extent is the view's ``lengths[0]``).
    """

    entries: torch.Tensor
    bits: tuple[int, ...]
    blocks: int

    def __post_init__(self) -> None:
        if self.entries.dtype != torch.int64 or self.entries.shape != (book_length(self.blocks),):
            raise ValueError(f"PoolBook.entries must be int64 (book_length(blocks),) = ({book_length(self.blocks)},) "
                             f"for blocks={self.blocks}; got {self.entries.dtype} {tuple(self.entries.shape)}.")


def book_entries(full_k: torch.Tensor, full_v: torch.Tensor, pools: dict[int, QuantPool]) -> list[int]:
    """The entries of an address book over these tensors (0 for precisions without a pool).

    Every tensor must be row-major in its (rows, channels) plane; keys and values of one kind share strides.
    """
    _check_book_pair(full_k, full_v, "full_k/full_v")
    out = [full_k.data_ptr(), full_v.data_ptr(), *full_k.stride()[:3]]
    for bits in QUANT_BITS:
        pool = pools.get(bits)
        if pool is None:
            out += [0] * len(BOOK_QUANT)
            continue
        _check_book_pair(pool.k_codes, pool.v_codes, f"{bits}-bit codes")
        _check_book_pair(pool.k_scale, pool.k_zero, f"{bits}-bit key scales")
        _check_book_pair(pool.v_scale, pool.v_zero, f"{bits}-bit value scales")
        out += [getattr(pool, name).data_ptr() for name in BOOK_QUANT[:6]]
        out += [*pool.k_codes.stride()[:2], *pool.k_scale.stride()[:2], *pool.v_scale.stride()[:2]]
    return out


BOOK_ALIGN = 16  # bytes: the kernel declares every address and plane stride it reads from a book a multiple of this


def _check_book_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.stride() != b.stride() or a.stride()[-1] != 1 or a.stride()[-2] != a.shape[-1]:
        raise ValueError(f"an address book needs {what} row-major with shared strides; got shapes "
                         f"{tuple(a.shape)}/{tuple(b.shape)}, strides {a.stride()}/{b.stride()}. Allocate pools "
                         "contiguously (BlockPool does).")
    size = a.element_size()
    offsets = [t.data_ptr() for t in (a, b)] + [s * size for s in a.stride()[:2]]
    if a.dim() == 4 and a.shape[-1] * size % BOOK_ALIGN == 0:  # rows of whole 16-byte units: the row stride too
        offsets.append(a.stride(2) * size)
    if any(o % BOOK_ALIGN for o in offsets):
        raise ValueError(f"an address book needs {what} at {BOOK_ALIGN}-byte aligned addresses with batch/head strides "
                         f"of whole {BOOK_ALIGN}-byte units; got data pointers {a.data_ptr():#x}/{b.data_ptr():#x}, "
                         f"strides {a.stride()} of {size}-byte elements. Allocate pools as whole tensors (BlockPool "
                         "does), not as offset views.")


def resolve_static(view: PackedKV) -> PackedKV:
    """A static view cut to its live extents (reads ``lengths`` on the host: one sync; reference path only)."""
    if view.lengths is None:
        return view
    n_blocks, n_tail = (int(x) for x in view.lengths.tolist())
    return PackedKV(view.block_size, view.value_group, view.block_bits[:n_blocks], view.block_slot[:n_blocks],
                    view.full_k, view.full_v, view.tail_k[:, :, :n_tail], view.tail_v[:, :, :n_tail], view.pools)


def attach_packed_view(key: torch.Tensor, packed: PackedKV) -> torch.Tensor:
    """Mark ``key`` (what a cache layer's ``update()`` returns) as standing for the packed layer ``packed``.

    The hand-off between a cache layer and the attention function: the modeling code passes ``update()``'s key
    straight to the attention function, which finds the layer with :func:`packed_view_of` (no global state, no
    registry keyed by layer index). Returns ``key`` itself.
    """
    if not isinstance(packed, PackedKV):
        raise TypeError(f"packed must be a hf_adaptive.kv.packed.PackedKV; got {type(packed).__name__}.")
    setattr(key, _PACKED_ATTR, packed)
    return key


def packed_view_of(key: torch.Tensor) -> PackedKV | None:
    """The packed layer attached to ``key`` by :func:`attach_packed_view`, or None for a plain key tensor."""
    return getattr(key, _PACKED_ATTR, None)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (..., D) in [0, 2**bits) into uint8 (..., D * bits // 8), split planes (module doc)."""
    if bits == 8:
        return codes.to(torch.uint8)
    per_byte = 8 // bits
    planes = codes.to(torch.uint8).unflatten(-1, (per_byte, -1))  # (..., field, byte)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8).unsqueeze(-1)
    return (planes << shifts).sum(-2, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 (..., D * bits // 8) -> uint8 codes (..., D)."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8).unsqueeze(-1)
    mask = (1 << bits) - 1
    return ((packed.unsqueeze(-2) >> shifts) & mask).flatten(-2)


def quantize_keys(x: torch.Tensor, bits: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize keys per channel over the tokens of each block (KIVI).

    Args:
        x: (B, H, n * block_size, D) keys, whole blocks only.
        bits: 8, 4 or 2.
        block_size: tokens per block (one scale/zero per block and channel).
    Returns:
        packed codes uint8 (B, H, n * block_size, D * bits // 8), scale and zero float16 (B, H, n, D).
    """
    raise_if_bad_bits(bits)
    B, H, S, D = x.shape
    if S % block_size:
        raise ValueError(f"quantize_keys needs whole blocks: {S} tokens is not a multiple of block_size={block_size}.")
    g = x.float().view(B, H, S // block_size, block_size, D)
    lo, hi = g.amin(-2, keepdim=True), g.amax(-2, keepdim=True)
    scale, zero = _scale_zero(lo, hi, bits)
    codes = _codes(g, scale, zero, bits).view(B, H, S, D)
    return pack_codes(codes, bits), scale.squeeze(-2).to(SCALE_DTYPE), zero.squeeze(-2).to(SCALE_DTYPE)


def quantize_values(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize values per token, in groups of ``group`` channels.

    Args:
        x: (B, H, S, D) values.
    Returns:
        packed codes uint8 (B, H, S, D * bits // 8), scale and zero float16 (B, H, S, D // group).
    """
    raise_if_bad_bits(bits)
    B, H, S, D = x.shape
    g = x.float().view(B, H, S, D // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale, zero = _scale_zero(lo, hi, bits)
    codes = _codes(g, scale, zero, bits).view(B, H, S, D)
    return pack_codes(codes, bits), scale.squeeze(-1).to(SCALE_DTYPE), zero.squeeze(-1).to(SCALE_DTYPE)


def dequantize_keys(packed, scale, zero, bits: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, n * T, D * bits // 8) codes + (B, H, n, D) scale/zero -> (B, H, n * T, D) in ``dtype``."""
    codes = unpack_codes(packed, bits).float()
    B, H, S, D = codes.shape
    c = codes.view(B, H, S // block_size, block_size, D)
    x = c * scale.float().unsqueeze(-2) + zero.float().unsqueeze(-2)
    return x.view(B, H, S, D).to(dtype)


def dequantize_values(packed, scale, zero, bits: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, S, D * bits // 8) codes + (B, H, S, D // G) scale/zero -> (B, H, S, D) in ``dtype``."""
    codes = unpack_codes(packed, bits).float()
    B, H, S, D = codes.shape
    c = codes.view(B, H, S, D // group, group)
    x = c * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return x.view(B, H, S, D).to(dtype)


def raise_if_bad_bits(bits: int) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"bits={bits!r} is not a supported quantized precision; use one of {QUANT_BITS}.")


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    # fp16 storage of scale/zero: round them first so that codes are computed against the stored values
    zero = lo.to(SCALE_DTYPE).float()
    scale = ((hi - zero) / (2**bits - 1)).clamp_min(1e-6).to(SCALE_DTYPE).float()
    return scale, zero


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return ((x - zero) / scale).round_().clamp_(0, 2**bits - 1)

