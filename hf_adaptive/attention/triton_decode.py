"""Fused decode attention over the packed KV layout (Triton, flash-decoding style).

Knows nothing about transformers. Given one decode query per sequence (q_len = 1) and a
:class:`~hf_adaptive.kv.packed.PackedKV`, computes softmax attention without ever writing a dequantized
copy of the history to global memory:

- stage 1, grid (splits, kv heads, batch): each program walks a contiguous range of ``CHUNK``-token
  chunks in logical order; a history chunk is found through the block table (``block_bits``,
  ``block_slot``) and read from the pool of its precision (16-bit rows, or 8/4/2-bit codes whose float16
  scales and zeros are folded into the query and the softmax weights, see ``_triton_kernels``); chunks past the
  history read the exact tail. All query
  heads of the KV group are processed together (GQA), padded to 16 rows for ``tl.dot``. It writes a
  partial (row max, row sum, unnormalized output) per split;
- stage 2, grid (batch * q heads): merges the splits with log-sum-exp weights.

The module imports without triton (``HAS_TRITON`` is False then); set ``TRITON_INTERPRET=1`` before
importing it to run the kernels on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass

import torch

from hf_adaptive.attention.reference import check_packed_query
from hf_adaptive.kv.packed import PackedKV

logger = logging.getLogger(__name__)

try:
    import triton

    from hf_adaptive.attention import _triton_kernels as kernels

    HAS_TRITON = True
except ImportError:  # no triton for this platform (it is a dependency on Linux); the torch reference serves
    triton = None
    kernels = None
    HAS_TRITON = False

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
# triton reads TRITON_INTERPRET when kernels are decorated, i.e. when this module is imported
_INTERPRETING = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class DecodeKernelConfig:
    """Launch knobs of the fused kernel; None picks the default for the head dim.

    Attributes:
        chunk: tokens per inner-loop tile (power of two, 16..block_size); default 64, 32 for D = 256.
        num_warps: warps per program; default 8 for D >= 128, else 2 for 16-bit models (their quantized tiles fold
            through float16 dots; on an H100 two warps beat four at every measured shape,
            ``eval/results/kv_decode_kernel_f16_fold_h100``) and 4 for float32 ones.
        waves: target number of programs per SM when choosing the number of splits; 4 by default (on an H100,
            ``eval/results/kv_decode_launch_waves_h100``, it beat 2 by 9-14 % at 8 x 32k with 4-, 8- and 16-bit
            history, e.g. 155 against 180 µs at 4 bits, and tied at 1 x 64k and 8 x 4k).
        max_splits: upper bound on splits per (batch, kv head).
        num_stages: Triton software-pipelining stages of the launch. The default 5 copies a static view's code tiles
            two chunks ahead (the block's slot, looked up first, takes one stage); Triton's own default, 3, one.
            Launches whose model-dtype tiles exceed 16 KiB (float32 at D >= 128) use at most 4
            (:func:`launch_stages`), so their copies fit a Hopper SM's shared memory.
        max_registers: cap on registers per thread (Triton's ``maxnreg``; None: the compiler's choice). Programs per
            SM are bound by registers (65536 / (registers x 32 x warps)); a cap trades a few spilled bytes for more
            programs, hence more bytes in flight. ``eval/kernel_registers.py`` reports both.
    """

    chunk: int | None = None
    num_warps: int | None = None
    waves: int = 4
    max_splits: int = 64
    num_stages: int = 5
    max_registers: int | None = None

    def __post_init__(self) -> None:
        if self.chunk is not None and (self.chunk < 16 or self.chunk & (self.chunk - 1)):
            raise ValueError(f"chunk={self.chunk} must be a power of two >= 16 (or None for the default).")
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps} must be one of 1, 2, 4, 8, 16 (or None).")
        if self.max_registers is not None and not 24 <= self.max_registers <= 255:
            raise ValueError(f"max_registers={self.max_registers} must be in 24..255 (or None for the compiler's choice).")
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be >= 1.")
        if self.waves < 1 or self.max_splits < 1:
            raise ValueError(f"waves={self.waves} and max_splits={self.max_splits} must be >= 1.")


def triton_decode_attention(
    query: torch.Tensor,
    packed: PackedKV,
    *,
    scaling: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    key_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: DecodeKernelConfig | None = None,
) -> torch.Tensor:
    """Decode attention of one query token per sequence over a packed KV layer, in one fused pass.

    Args:
        query: (B, Hq, 1, D) in the model dtype (float16, bfloat16 or float32); Hq a multiple of the
            layer's kv heads H (GQA); D in ``SUPPORTED_HEAD_DIMS``.
        packed: the layer's keys/values (N = ``packed.num_tokens`` tokens, logical order).
        scaling: multiplier of q·k (usually ``D ** -0.5``).
        softcap: if set, scores become ``softcap * tanh(score / softcap)`` (Gemma-2 style).
        sliding_window: if set, only the last ``sliding_window`` keys are attended.
        key_mask: optional (B, N) bool, True where a key may be attended (left padding).
        out: optional (B, Hq, 1, D) buffer in the query's dtype to write into (e.g. a CUDA-graph static output).
        config: launch knobs (tile size, warps, splits); defaults suit H100-class GPUs.
    Returns:
        (B, Hq, 1, D) in the query's dtype (``out`` when given).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton_decode_attention needs triton; install it (`pip install triton`) or use "
                           "hf_adaptive.attention.reference.reference_decode_attention on this machine.")
    _check_inputs(query, packed, key_mask, out)
    B, Hq, _, D = query.shape
    config = config or DecodeKernelConfig()
    plan = _plan_launch(query, packed, sliding_window, config)
    acc = torch.empty(B, Hq, plan.splits, D, device=query.device, dtype=torch.float32)
    m = torch.empty(B, Hq, plan.splits, device=query.device, dtype=torch.float32)
    lse = torch.empty_like(m)
    q = query[:, :, 0, :]  # (B, Hq, D) view; the kernel reads it with its strides
    book = packed.book  # when set, the kernel reads the table and the history storage through it: none is passed
    bits = set(book.bits) if book is not None else set(packed.pools)
    mask = _dummy(query.device, torch.int8)
    if key_mask is not None:
        # the bool mask is read as it is (one byte per key): converting it would add a copy kernel per layer and step
        # to the captured graph
        mask = key_mask if key_mask.stride(-1) == 1 else key_mask.contiguous()
    kernels.decode_split_kernel[(plan.splits, plan.kv_heads, B)](
        q, q.stride(0), q.stride(1),
        packed.block_bits if packed.block_bits.numel() and book is None else _dummy(query.device, torch.int32),
        packed.block_slot if packed.block_slot.numel() and book is None else _dummy(query.device, torch.int32),
        *_rows16_args(*((packed.full_k, packed.full_v) if book is None else (_NONE, _NONE)), query),
        *_rows16_args(packed.tail_k, packed.tail_v, query),
        *(a for b in (8, 4, 2) for a in _pool_args(packed if book is None else _NO_POOLS, b, query.device)),
        mask, mask.stride(0) if key_mask is not None else 0,
        acc, m, lse, packed.lengths if packed.lengths is not None else _dummy(query.device, torch.int32),
        book.entries if book is not None else _dummy(query.device, torch.int64), book.blocks if book is not None else 0,
        plan.n_hist_chunks, plan.n_tail, packed.num_tokens, plan.first_chunk, plan.per_split, plan.splits,
        float(scaling), float(softcap or 0.0),
        GROUP=plan.group, GP=max(16, triton.next_power_of_2(plan.group)), D=D, HD=max(16, D // 2), G=packed.value_group,
        BS=packed.block_size, CHUNK=plan.chunk, HAS8=8 in bits, HAS4=4 in bits, HAS2=2 in bits,
        HAS_MASK=key_mask is not None, WINDOW=plan.window, SOFTCAP=softcap is not None,
        F32_DOTS=_INTERPRETING, DEVICE_LENS=packed.lengths is not None, BOOK=book is not None,
        num_warps=plan.num_warps, num_stages=launch_stages(config, query.dtype, plan.chunk, D),
        maxnreg=config.max_registers,
    )
    out = torch.empty(B, Hq, 1, D, device=query.device, dtype=query.dtype) if out is None else out
    kernels.merge_splits_kernel[(B * Hq,)](acc, m, lse, out, out.stride(0), out.stride(1), Hq, plan.splits,
                                           SP=triton.next_power_of_2(plan.splits), D=D, num_warps=4)
    return out


_NONE = torch.empty(0)  # a history the kernel reads through the address book instead


class _NoPools:
    pools: dict = {}


_NO_POOLS = _NoPools()


@dataclass(frozen=True)
class _LaunchPlan:
    """Host-side numbers of one launch (all from shapes: no device reads)."""

    group: int  # query heads per kv head
    kv_heads: int
    chunk: int  # tokens per inner tile
    n_hist_chunks: int
    n_tail: int
    window: int  # 0 = no sliding window
    first_chunk: int  # first chunk a sliding window can see
    splits: int
    per_split: int  # chunks per split
    num_warps: int


def _plan_launch(query: torch.Tensor, packed: PackedKV, sliding_window: int | None,
                 config: DecodeKernelConfig) -> _LaunchPlan:
    B, Hq, _, D = query.shape
    H = packed.tail_k.shape[1]
    chunk = min(config.chunk or (32 if D >= 256 else 64), packed.block_size)
    n_blocks = packed.book.blocks if packed.book is not None else packed.block_bits.numel()
    n_hist_chunks = n_blocks * (packed.block_size // chunk)
    n_tail = packed.tail_k.shape[-2]
    n_chunks = n_hist_chunks + -(-n_tail // chunk)
    window = int(sliding_window or 0)
    if window and packed.lengths is not None:
        raise ValueError("a static packed view (device lengths) does not support sliding_window; static caches "
                         "hold full-attention layers only.")
    first_chunk = max(0, packed.num_tokens - window) // chunk if window else 0
    splits = _choose_splits(n_chunks - first_chunk, B * H, query.device, config)
    per_split = max(1, -(-(n_chunks - first_chunk) // splits))
    return _LaunchPlan(Hq // H, H, chunk, n_hist_chunks, n_tail, window, first_chunk, splits, per_split,
                       config.num_warps or (8 if D >= 128 else 4 if query.dtype == torch.float32 else 2))


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter on CPU: any small number of splits exercises the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


WIDE_TILE_BYTES = 16384  # a model-dtype tile (chunk x head dim) above this is wide; bf16 at 64 x 128 fits 5 stages
WIDE_TILE_MAX_STAGES = 4


def launch_stages(config: DecodeKernelConfig, dtype: torch.dtype, chunk: int, head_dim: int) -> int:
    """Pipelining depth of a launch: ``config.num_stages``, at most ``WIDE_TILE_MAX_STAGES`` when one model-dtype tile
    (``chunk`` x ``head_dim``) exceeds ``WIDE_TILE_BYTES``: every stage holds copies of such tiles in shared memory,
    and at 5 stages a float32 D = 128 build needs 268 KiB, over the 227 KiB of a Hopper SM
    (``triton.runtime.errors.OutOfResources`` inside ``model.generate``)."""
    wide = chunk * head_dim * dtype.itemsize > WIDE_TILE_BYTES
    return min(config.num_stages, WIDE_TILE_MAX_STAGES) if wide else config.num_stages


def _choose_splits(n_chunks: int, programs: int, device: torch.device, config: DecodeKernelConfig) -> int:
    """Enough splits that (batch * kv heads * splits) fills the GPU ``waves`` times, a power of two."""
    want = max(1, math.ceil(config.waves * _sm_count(device) / max(programs, 1)))
    want = min(want, max(n_chunks, 1), config.max_splits)
    return 1 << (want - 1).bit_length() if want > 1 else 1


def kernel_signature(constexprs: dict, model_dtype: str = "bf16") -> dict[str, str]:
    """Triton signature of ``decode_split_kernel`` for an ahead-of-time ``triton.compile`` (no GPU needed): every
    argument named in ``constexprs`` is a constexpr, the rest typed from its name (``model_dtype``: the query's and
    the 16-bit pool's Triton type, e.g. ``"bf16"``)."""
    if not HAS_TRITON:
        raise RuntimeError("kernel_signature needs triton (pip install triton).")
    return {name: _arg_type(name, constexprs, model_dtype) for name in kernels.decode_split_kernel.arg_names}


def _arg_type(name: str, constexprs: dict, model_dtype: str) -> str:
    if name in constexprs:
        return "constexpr"
    if name in ("q_ptr", "fk_ptr", "fv_ptr", "tk_ptr", "tv_ptr"):
        return f"*{model_dtype}"
    if name in ("bits_ptr", "slot_ptr", "lens_ptr"):
        return "*i32"
    if name in ("acc_ptr", "m_ptr", "l_ptr"):
        return "*fp32"
    if name == "mask_ptr":
        return "*i1"  # the caches pass transformers' bool mask
    if name == "book_ptr":
        return "*i64"
    if len(name) == 3 and name[0] in "kv" and name[1] in "842":  # k8c, v4s, ...: codes or scale/zero
        return "*u8" if name[2] == "c" else "*fp16"
    return "fp32" if name in ("qk_scale", "softcap") else "i32"


@functools.lru_cache(maxsize=32)
def _dummy_cached(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(16, device=device, dtype=dtype)


def warm_placeholders(device: torch.device, model_dtype: torch.dtype) -> None:
    """Create the placeholder tensors the kernel passes for absent inputs on ``device`` now (they are cached), so
    none is first allocated inside a CUDA-graph capture or warm-up."""
    for dtype in (torch.uint8, torch.int8, torch.int32, torch.float16, model_dtype):
        _dummy(device, dtype)


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # a real allocation for absent or empty tensors: the branch that would read it is compiled out
    return _dummy_cached(device, dtype)


def _rows16_args(k: torch.Tensor, v: torch.Tensor, query: torch.Tensor) -> list:
    """Kernel arguments of a model-dtype (B, H, S, D) key/value pair: pointers and one stride set."""
    if k.numel() == 0:
        d = _dummy(query.device, query.dtype)
        return [d, d, 0, 0, 0]
    sk = k.stride()  # one stride() call per tensor: this runs per layer and token
    if sk != v.stride() or sk[-1] != 1:
        k, v = k.contiguous(), v.contiguous()
        sk = k.stride()
    return [k, v, sk[0], sk[1], sk[2]]


def _pool_args(packed: PackedKV, bits: int, device: torch.device) -> list:
    pool = packed.pools.get(bits)
    if pool is None or pool.k_codes.numel() == 0:
        u8, f16 = _dummy(device, torch.uint8), _dummy(device, torch.float16)
        return [u8, f16, f16, u8, f16, f16] + [0] * 6
    kc, vc, sc = _rows_contiguous(pool.k_codes, pool.v_codes)
    ks, kz, sk = _rows_contiguous(pool.k_scale, pool.k_zero)
    vs, vz, sv = _rows_contiguous(pool.v_scale, pool.v_zero)
    return [kc, ks, kz, vc, vs, vz, sc[0], sc[1], sk[0], sk[1], sv[0], sv[1]]


def _rows_contiguous(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Two same-shape tensors whose (S, C) planes are row-major and which share strides; returns the strides."""
    sa = a.stride()
    if sa == b.stride() and sa[-1] == 1 and sa[-2] == a.shape[-1]:
        return a, b, sa
    logger.warning("packed pool tensors of shape %s are not row-contiguous with shared strides %s / %s; "
                   "copying them (slow). Allocate pools contiguously.", tuple(a.shape), sa, b.stride())
    a, b = a.contiguous(), b.contiguous()
    return a, b, a.stride()


def _check_inputs(query: torch.Tensor, packed: PackedKV, key_mask: torch.Tensor | None,
                  out: torch.Tensor | None) -> None:
    """Shape/dtype/device checks of the fused kernel on top of the reference's; metadata only, no syncs."""
    check_packed_query(query, packed, key_mask)
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype or out.stride(-1) != 1):
        raise ValueError(f"out must be {tuple(query.shape)} {query.dtype} with unit last stride; got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}.")
    B, Hq, L, D = query.shape
    if L != 1:
        raise ValueError(f"triton_decode_attention is for decode: query q_len must be 1, got {L} (query "
                         f"{tuple(query.shape)}); use sdpa over gather_packed_kv(...) for prefill.")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={D} is not supported by the fused kernel; supported: {SUPPORTED_HEAD_DIMS}.")
    if packed.lengths is not None and (packed.lengths.dtype != torch.int32 or packed.lengths.numel() != 2
                                       or packed.lengths.device != query.device):
        raise ValueError(f"packed.lengths must be int32 (2,) [history blocks, tail tokens] on {query.device}; got "
                         f"{packed.lengths.dtype} {tuple(packed.lengths.shape)} on {packed.lengths.device}.")
    bs = packed.block_size
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"block_size={bs} must be a power of two >= 16 for the fused kernel.")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"query dtype {query.dtype} not supported; use float16, bfloat16 or float32.")
    if query.stride(-1) != 1:
        raise ValueError(f"query must have unit stride on the head dim; got strides {query.stride()}.")
    for name in ("tail_k", "tail_v", "full_k", "full_v"):
        t = getattr(packed, name)
        if t.numel() and (t.dtype != query.dtype or t.device != query.device):
            raise ValueError(f"packed.{name} is {t.dtype} on {t.device}; the query is {query.dtype} on "
                             f"{query.device}. Keep the exact KV in the model dtype, on the query's device.")
    if packed.block_bits.dtype not in (torch.int32, torch.int64) or packed.block_slot.dtype != packed.block_bits.dtype:
        raise ValueError(f"block_bits/block_slot must both be int32 (or both int64, a static view's); got "
                         f"{packed.block_bits.dtype}/{packed.block_slot.dtype}.")
    if packed.block_bits.numel() and packed.block_bits.device != query.device:
        raise ValueError(f"block table is on {packed.block_bits.device}, query on {query.device}; keep them together.")
