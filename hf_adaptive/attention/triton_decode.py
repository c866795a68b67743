"""Fused decode attention over the packed KV layout (Triton, flash-decoding style).

Knows nothing about transformers. Given one decode query per sequence (q_len = 1) and a
:class:`~hf_adaptive.kv.packed.PackedKV`, computes softmax attention without ever writing a dequantized
copy of the history to global memory:

- stage 1, grid (splits, kv heads, batch): each program walks a contiguous range of ``CHUNK``-token
  chunks in logical order; a history chunk is found through the block table (``block_bits``,
  ``block_slot``) and read from the pool of its precision (16-bit rows, or 8/4/2-bit codes dequantized
  in registers with their float16 scale/zero); chunks past the history read the exact tail. All query
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

import torch

from hf_adaptive.attention.reference import check_packed_query
from hf_adaptive.kv.packed import PackedKV

logger = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the CPU install has no triton; the torch reference serves there
    triton = None
    tl = None
    HAS_TRITON = False

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_INTERPRETING = HAS_TRITON and bool(triton.knobs.runtime.interpret)
_MAX_SPLITS = 64

if HAS_TRITON:

    @triton.jit
    def _load_rows_16(k_base, v_base, rows, row_ok, offs_d, stride_row, DT: tl.constexpr):
        """A (CHUNK, D) tile of keys and values held in the model dtype, as ``DT``."""
        off = rows[:, None].to(tl.int64) * stride_row + offs_d[None, :]
        k = tl.load(k_base + off, mask=row_ok[:, None], other=0.0).to(DT)
        v = tl.load(v_base + off, mask=row_ok[:, None], other=0.0).to(DT)
        return k, v

    @triton.jit
    def _unpack(codes_base, rows, offs_d, D: tl.constexpr, BITS: tl.constexpr):
        """Codes of a (CHUNK, D) tile packed low bits first along channels, as float32."""
        PER_BYTE: tl.constexpr = 8 // BITS
        byte = tl.load(codes_base + rows[:, None].to(tl.int64) * (D // PER_BYTE) + (offs_d // PER_BYTE)[None, :])
        shift = (offs_d % PER_BYTE) * BITS
        return ((byte.to(tl.int32) >> shift[None, :]) & ((1 << BITS) - 1)).to(tl.float32)

    @triton.jit
    def _load_rows_quant(kc, ks, kz, vc, vs, vz, slot, rows, offs_d, D: tl.constexpr, G: tl.constexpr,
                         BITS: tl.constexpr, DT: tl.constexpr):
        """A (CHUNK, D) tile dequantized in registers: keys per channel of the block, values per token group."""
        k_scale = tl.load(ks + slot.to(tl.int64) * D + offs_d).to(tl.float32)
        k_zero = tl.load(kz + slot.to(tl.int64) * D + offs_d).to(tl.float32)
        k = _unpack(kc, rows, offs_d, D, BITS) * k_scale[None, :] + k_zero[None, :]
        g_off = rows[:, None].to(tl.int64) * (D // G) + (offs_d // G)[None, :]
        v_scale = tl.load(vs + g_off).to(tl.float32)
        v_zero = tl.load(vz + g_off).to(tl.float32)
        v = _unpack(vc, rows, offs_d, D, BITS) * v_scale + v_zero
        return k.to(DT), v.to(DT)  # narrow right away: halves the registers the tiles hold

    @triton.jit
    def _chunk_kv(c, bits_ptr, slot_ptr, fk, fv, sf_r, tk, tv, st_r,
                  k8c, k8s, k8z, v8c, v8s, v8z, k4c, k4s, k4z, v4c, v4s, v4z, k2c, k2s, k2z, v2c, v2s, v2z,
                  n_hist_chunks, n_tail, offs_n, offs_d, D: tl.constexpr, G: tl.constexpr, BS: tl.constexpr,
                  CHUNK: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr, HAS2: tl.constexpr,
                  DT: tl.constexpr):
        """(CHUNK, D) keys and values of logical chunk ``c``: via the block table, or from the tail.

        All pointers are already offset to this program's (batch, kv head) plane.
        """
        CPB: tl.constexpr = BS // CHUNK
        k = tl.zeros([CHUNK, D], DT)
        v = tl.zeros([CHUNK, D], DT)
        if c < n_hist_chunks:
            bits = tl.load(bits_ptr + c // CPB)
            slot = tl.load(slot_ptr + c // CPB)
            rows = slot * BS + (c % CPB) * CHUNK + offs_n
            if bits == 16:
                k, v = _load_rows_16(fk, fv, rows, offs_n < CHUNK, offs_d, sf_r, DT)
            if HAS8:
                if bits == 8:
                    k, v = _load_rows_quant(k8c, k8s, k8z, v8c, v8s, v8z, slot, rows, offs_d, D, G, 8, DT)
            if HAS4:
                if bits == 4:
                    k, v = _load_rows_quant(k4c, k4s, k4z, v4c, v4s, v4z, slot, rows, offs_d, D, G, 4, DT)
            if HAS2:
                if bits == 2:
                    k, v = _load_rows_quant(k2c, k2s, k2z, v2c, v2s, v2z, slot, rows, offs_d, D, G, 2, DT)
        else:
            t_rows = (c - n_hist_chunks) * CHUNK + offs_n
            k, v = _load_rows_16(tk, tv, t_rows, t_rows < n_tail, offs_d, st_r, DT)
        return k, v

    @triton.jit
    def _online_softmax_step(q, k, v, valid, m_i, l_i, acc, qk_scale, softcap, SOFTCAP: tl.constexpr):
        """Fold one (CHUNK, D) tile into the running (max, sum, output) of the (GP, D) query rows."""
        dot_ty = q.dtype
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (GP, CHUNK); scaled in float32, q stays exact
        if SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
        s = tl.where(valid[None, :], s * 1.4426950408889634, float("-inf"))  # log2 units for exp2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_ty), v)
        return m_new, l_i, acc

    @triton.jit
    def _attend_chunk(c, q, m_i, l_i, acc, bits_ptr, slot_ptr, fk, fv, sf_r, tk, tv, st_r,
                      k8c, k8s, k8z, v8c, v8s, v8z, k4c, k4s, k4z, v4c, v4s, v4z, k2c, k2s, k2z, v2c, v2s, v2z,
                      mask_row, n_hist_chunks, n_tail, n_total, qk_scale, softcap, offs_n, offs_d,
                      D: tl.constexpr, G: tl.constexpr, BS: tl.constexpr, CHUNK: tl.constexpr,
                      HAS8: tl.constexpr, HAS4: tl.constexpr, HAS2: tl.constexpr, HAS_MASK: tl.constexpr,
                      WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
        k, v = _chunk_kv(c, bits_ptr, slot_ptr, fk, fv, sf_r, tk, tv, st_r,
                         k8c, k8s, k8z, v8c, v8s, v8z, k4c, k4s, k4z, v4c, v4s, v4z, k2c, k2s, k2z, v2c, v2s, v2z,
                         n_hist_chunks, n_tail, offs_n, offs_d, D, G, BS, CHUNK, HAS8, HAS4, HAS2, q.dtype)
        pos = c * CHUNK + offs_n
        valid = pos < n_total
        if WINDOW > 0:
            valid = valid & (pos > n_total - 1 - WINDOW)
        if HAS_MASK:
            valid = valid & (tl.load(mask_row + pos, mask=pos < n_total, other=0) != 0)
        return _online_softmax_step(q, k, v, valid, m_i, l_i, acc, qk_scale, softcap, SOFTCAP)

    @triton.jit
    def _decode_split_kernel(
        q_ptr, sq_b, sq_h,
        bits_ptr, slot_ptr,
        fk_ptr, fv_ptr, sf_b, sf_h, sf_r,
        tk_ptr, tv_ptr, st_b, st_h, st_r,
        k8c, k8s, k8z, v8c, v8s, v8z, s8c_b, s8c_h, s8k_b, s8k_h, s8v_b, s8v_h,
        k4c, k4s, k4z, v4c, v4s, v4z, s4c_b, s4c_h, s4k_b, s4k_h, s4v_b, s4v_h,
        k2c, k2s, k2z, v2c, v2s, v2z, s2c_b, s2c_h, s2k_b, s2k_h, s2v_b, s2v_h,
        mask_ptr, sm_b,
        acc_ptr, m_ptr, l_ptr,
        n_hist_chunks, n_tail, n_total, first_chunk, chunks_per_split, n_splits, qk_scale, softcap,
        GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BS: tl.constexpr,
        CHUNK: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr, HAS2: tl.constexpr,
        HAS_MASK: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, WHILE_LOOP: tl.constexpr,
    ):
        """Partial attention of one (split, kv head, batch): the group's query heads over its chunks."""
        split = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        offs_g = tl.arange(0, GP)
        offs_n = tl.arange(0, CHUNK)
        offs_d = tl.arange(0, D)
        # (GP, D) the group's query heads; rows past GROUP are padding for tl.dot's 16-row minimum
        q_off = b * sq_b + (h * GROUP + offs_g)[:, None] * sq_h + offs_d[None, :]
        q = tl.load(q_ptr + q_off, mask=(offs_g < GROUP)[:, None], other=0.0)
        if WHILE_LOOP:  # on GPU the dots run in the model dtype; the interpreter's bf16 dot is broken
            q = q.to(tl.float32)
        m_i = tl.full([GP], -1.0e30, tl.float32)  # finite: a fully masked chunk then adds exp2(-inf) = 0
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        # splits tile [first_chunk, n_chunks): chunks before a sliding window's start are never read
        c_lo = first_chunk + split * chunks_per_split
        c_hi = tl.minimum(c_lo + chunks_per_split, n_hist_chunks + tl.cdiv(n_tail, CHUNK))
        # WHILE_LOOP is set under TRITON_INTERPRET: its range() over tensors fails with numpy >= 2.4
        if WHILE_LOOP:
            c = c_lo
            while c < c_hi:
                m_i, l_i, acc = _attend_chunk(
                    c, q, m_i, l_i, acc, bits_ptr, slot_ptr, fk_ptr + b * sf_b + h * sf_h,
                    fv_ptr + b * sf_b + h * sf_h, sf_r, tk_ptr + b * st_b + h * st_h, tv_ptr + b * st_b + h * st_h,
                    st_r, k8c + b * s8c_b + h * s8c_h, k8s + b * s8k_b + h * s8k_h, k8z + b * s8k_b + h * s8k_h,
                    v8c + b * s8c_b + h * s8c_h, v8s + b * s8v_b + h * s8v_h, v8z + b * s8v_b + h * s8v_h,
                    k4c + b * s4c_b + h * s4c_h, k4s + b * s4k_b + h * s4k_h, k4z + b * s4k_b + h * s4k_h,
                    v4c + b * s4c_b + h * s4c_h, v4s + b * s4v_b + h * s4v_h, v4z + b * s4v_b + h * s4v_h,
                    k2c + b * s2c_b + h * s2c_h, k2s + b * s2k_b + h * s2k_h, k2z + b * s2k_b + h * s2k_h,
                    v2c + b * s2c_b + h * s2c_h, v2s + b * s2v_b + h * s2v_h, v2z + b * s2v_b + h * s2v_h,
                    mask_ptr + b * sm_b, n_hist_chunks, n_tail, n_total, qk_scale, softcap, offs_n, offs_d,
                    D, G, BS, CHUNK, HAS8, HAS4, HAS2, HAS_MASK, WINDOW, SOFTCAP)
                c += 1
        else:
            for c in range(c_lo, c_hi):
                m_i, l_i, acc = _attend_chunk(
                    c, q, m_i, l_i, acc, bits_ptr, slot_ptr, fk_ptr + b * sf_b + h * sf_h,
                    fv_ptr + b * sf_b + h * sf_h, sf_r, tk_ptr + b * st_b + h * st_h, tv_ptr + b * st_b + h * st_h,
                    st_r, k8c + b * s8c_b + h * s8c_h, k8s + b * s8k_b + h * s8k_h, k8z + b * s8k_b + h * s8k_h,
                    v8c + b * s8c_b + h * s8c_h, v8s + b * s8v_b + h * s8v_h, v8z + b * s8v_b + h * s8v_h,
                    k4c + b * s4c_b + h * s4c_h, k4s + b * s4k_b + h * s4k_h, k4z + b * s4k_b + h * s4k_h,
                    v4c + b * s4c_b + h * s4c_h, v4s + b * s4v_b + h * s4v_h, v4z + b * s4v_b + h * s4v_h,
                    k2c + b * s2c_b + h * s2c_h, k2s + b * s2k_b + h * s2k_h, k2z + b * s2k_b + h * s2k_h,
                    v2c + b * s2c_b + h * s2c_h, v2s + b * s2v_b + h * s2v_h, v2z + b * s2v_b + h * s2v_h,
                    mask_ptr + b * sm_b, n_hist_chunks, n_tail, n_total, qk_scale, softcap, offs_n, offs_d,
                    D, G, BS, CHUNK, HAS8, HAS4, HAS2, HAS_MASK, WINDOW, SOFTCAP)

        row = (b * (tl.num_programs(1) * GROUP) + h * GROUP + offs_g) * n_splits + split  # (B, Hq, splits)
        ok = offs_g < GROUP
        tl.store(m_ptr + row, m_i, mask=ok)
        tl.store(l_ptr + row, l_i, mask=ok)
        tl.store(acc_ptr + row[:, None] * D + offs_d[None, :], acc, mask=ok[:, None])

    @triton.jit
    def _merge_splits_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, so_b, so_h, n_heads, n_splits,
                             SP: tl.constexpr, D: tl.constexpr):
        """Log-sum-exp merge of the split partials of one (batch, q head) row into the output."""
        r = tl.program_id(0).to(tl.int64)
        offs_s = tl.arange(0, SP)
        offs_d = tl.arange(0, D)
        ok = offs_s < n_splits
        m = tl.load(m_ptr + r * n_splits + offs_s, mask=ok, other=float("-inf"))
        l = tl.load(l_ptr + r * n_splits + offs_s, mask=ok, other=0.0)
        acc = tl.load(acc_ptr + (r * n_splits + offs_s)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        w = tl.exp2(m - tl.max(m, 0))
        denom = tl.sum(w * l, 0)
        out = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)  # a fully masked row gives 0, not NaN
        b = r // n_heads
        h = r % n_heads
        tl.store(out_ptr + b * so_b + h * so_h + offs_d, out.to(out_ptr.dtype.element_ty))


def triton_decode_attention(
    query: torch.Tensor,
    packed: PackedKV,
    *,
    scaling: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    key_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
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
    Returns:
        (B, Hq, 1, D) in the query's dtype (``out`` when given).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton_decode_attention needs triton; install it (`pip install triton`) or use "
                           "hf_adaptive.attention.reference.reference_decode_attention on this machine.")
    _check_inputs(query, packed, key_mask)
    B, Hq, _, D = query.shape
    H = packed.tail_k.shape[1]
    chunk = _chunk_size(packed.block_size, D)
    n_hist_chunks = packed.block_bits.numel() * (packed.block_size // chunk)
    n_tail = packed.tail_k.shape[-2]
    n_total = packed.num_tokens
    n_chunks = n_hist_chunks + -(-n_tail // chunk)
    window = int(sliding_window or 0)
    first_chunk = max(0, n_total - window) // chunk if window else 0
    splits = _choose_splits(n_chunks - first_chunk, B * H, query.device)
    per_split = max(1, -(-(n_chunks - first_chunk) // splits))

    acc = torch.empty(B, Hq, splits, D, device=query.device, dtype=torch.float32)
    m = torch.empty(B, Hq, splits, device=query.device, dtype=torch.float32)
    lse = torch.empty_like(m)
    q = query[:, :, 0, :]  # (B, Hq, D) view; the kernel reads it with its strides
    mask = _dummy(query.device, torch.int8)
    if key_mask is not None:
        mask = key_mask.to(torch.int8)
        mask = mask if mask.stride(-1) == 1 else mask.contiguous()
    group = Hq // H
    _decode_split_kernel[(splits, H, B)](
        q, q.stride(0), q.stride(1),
        packed.block_bits if packed.block_bits.numel() else _dummy(query.device, torch.int32),
        packed.block_slot if packed.block_slot.numel() else _dummy(query.device, torch.int32),
        *_rows16_args(packed.full_k, packed.full_v, query),
        *_rows16_args(packed.tail_k, packed.tail_v, query),
        *_pool_args(packed, 8, query.device), *_pool_args(packed, 4, query.device),
        *_pool_args(packed, 2, query.device),
        mask, mask.stride(0) if key_mask is not None else 0,
        acc, m, lse,
        n_hist_chunks, n_tail, n_total, first_chunk, per_split, splits, float(scaling), float(softcap or 0.0),
        GROUP=group, GP=max(16, triton.next_power_of_2(group)), D=D, G=packed.value_group, BS=packed.block_size,
        CHUNK=chunk, HAS8=8 in packed.pools, HAS4=4 in packed.pools, HAS2=2 in packed.pools,
        HAS_MASK=key_mask is not None, WINDOW=window, SOFTCAP=softcap is not None, WHILE_LOOP=_INTERPRETING,
        num_warps=8 if D >= 256 else 4,
    )
    if out is None:
        out = torch.empty(B, Hq, 1, D, device=query.device, dtype=query.dtype)
    elif out.shape != query.shape or out.dtype != query.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(query.shape)} {query.dtype} with unit last stride; got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}.")
    _merge_splits_kernel[(B * Hq,)](acc, m, lse, out, out.stride(0), out.stride(1), Hq, splits,
                                    SP=triton.next_power_of_2(splits), D=D, num_warps=4)
    return out


def _chunk_size(block_size: int, head_dim: int) -> int:
    # 64 x D float32 tiles for keys and values fit the registers of 4 warps up to D = 128; halve it for 256
    return min(block_size, 32 if head_dim >= 256 else 64)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter on CPU: any small number of splits exercises the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


def _choose_splits(n_chunks: int, programs: int, device: torch.device) -> int:
    """Enough splits that (batch * kv heads * splits) fills the GPU about twice, a power of two."""
    want = max(1, math.ceil(2 * _sm_count(device) / max(programs, 1)))
    want = min(want, max(n_chunks, 1), _MAX_SPLITS)
    return 1 << (want - 1).bit_length() if want > 1 else 1


@functools.lru_cache(maxsize=32)
def _dummy_cached(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(16, device=device, dtype=dtype)


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # a real allocation for absent or empty tensors: the branch that would read it is compiled out
    return _dummy_cached(torch.device(device), dtype)


def _rows16_args(k: torch.Tensor, v: torch.Tensor, query: torch.Tensor) -> list:
    """Kernel arguments of a model-dtype (B, H, S, D) key/value pair: pointers and one stride set."""
    if k.numel() == 0:
        d = _dummy(query.device, query.dtype)
        return [d, d, 0, 0, 0]
    if k.stride() != v.stride() or k.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    return [k, v, k.stride(0), k.stride(1), k.stride(2)]


def _pool_args(packed: PackedKV, bits: int, device: torch.device) -> list:
    pool = packed.pools.get(bits)
    if pool is None or pool.k_codes.numel() == 0:
        u8, f16 = _dummy(device, torch.uint8), _dummy(device, torch.float16)
        return [u8, f16, f16, u8, f16, f16] + [0] * 6
    kc, vc = _rows_contiguous(pool.k_codes, pool.v_codes)
    ks, kz = _rows_contiguous(pool.k_scale, pool.k_zero)
    vs, vz = _rows_contiguous(pool.v_scale, pool.v_zero)
    return [kc, ks, kz, vc, vs, vz, kc.stride(0), kc.stride(1), ks.stride(0), ks.stride(1),
            vs.stride(0), vs.stride(1)]


def _rows_contiguous(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two same-shape tensors whose (S, C) planes are row-major and which share strides (one stride set)."""
    ok = a.stride() == b.stride() and a.stride(-1) == 1 and a.stride(-2) == a.shape[-1]
    if not ok:
        logger.warning("packed pool tensors of shape %s are not row-contiguous with shared strides %s / %s; "
                       "copying them (slow). Allocate pools contiguously.", tuple(a.shape), a.stride(), b.stride())
        return a.contiguous(), b.contiguous()
    return a, b


def _check_inputs(query: torch.Tensor, packed: PackedKV, key_mask: torch.Tensor | None) -> None:
    """Shape/dtype/device checks of the fused kernel on top of the reference's; metadata only, no syncs."""
    check_packed_query(query, packed, key_mask)
    B, Hq, L, D = query.shape
    if L != 1:
        raise ValueError(f"triton_decode_attention is for decode: query q_len must be 1, got {L} (query "
                         f"{tuple(query.shape)}); use sdpa over gather_packed_kv(...) for prefill.")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={D} is not supported by the fused kernel; supported: {SUPPORTED_HEAD_DIMS}.")
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
    if packed.block_bits.dtype != torch.int32 or packed.block_slot.dtype != torch.int32:
        raise ValueError(f"block_bits/block_slot must be int32; got {packed.block_bits.dtype}/"
                         f"{packed.block_slot.dtype}.")
    if packed.block_bits.numel() and packed.block_bits.device != query.device:
        raise ValueError(f"block table is on {packed.block_bits.device}, query on {query.device}; keep them together.")
