"""Triton kernels of the fused packed-KV decode attention; see :mod:`hf_adaptive.attention.triton_decode`.

Imported only where triton is installed. Stage 1 (``decode_split_kernel``) computes, per (split, kv head,
batch), partial softmax statistics of the KV group's query heads over a contiguous range of logical
chunks; stage 2 (``merge_splits_kernel``) merges the splits with log-sum-exp weights. Under
``TRITON_INTERPRET=1`` the host passes ``WHILE_LOOP=True`` (see the kernel) and float32 dots.
"""

import triton
import triton.language as tl


@triton.jit
def _load_rows_16(k_base, v_base, rows, row_ok, offs_d, stride_row, DT: tl.constexpr):
    """A (CHUNK, D) tile of keys and values held in the model dtype, as ``DT``."""
    off = rows[:, None] * stride_row + offs_d[None, :]
    k = tl.load(k_base + off, mask=row_ok[:, None], other=0.0).to(DT)
    v = tl.load(v_base + off, mask=row_ok[:, None], other=0.0).to(DT)
    return k, v


@triton.jit
def _unpack(codes_base, rows, offs_d, D: tl.constexpr, BITS: tl.constexpr, SPLIT: tl.constexpr):
    """Codes of a (CHUNK, D) tile packed low bits first along channels, as float32.

    SPLIT=False: every channel loads its own byte (bytes shared by 2 or 4 channels are loaded that many
    times, from L1). SPLIT=True: each byte is loaded once and its fields interleaved back in channel order.
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    if SPLIT and BITS < 8:
        offs_b = tl.arange(0, D // PER_BYTE)
        byte = tl.load(codes_base + rows[:, None] * (D // PER_BYTE) + offs_b[None, :]).to(tl.int32)
        if BITS == 4:
            codes = tl.interleave(byte & MASK, byte >> 4)
        else:  # 2 bits: fields 0..3 of each byte -> channels 4i..4i+3
            codes = tl.interleave(tl.interleave(byte & MASK, (byte >> 4) & MASK),
                                  tl.interleave((byte >> 2) & MASK, byte >> 6))
        return codes.to(tl.float32)
    byte = tl.load(codes_base + rows[:, None] * (D // PER_BYTE) + (offs_d // PER_BYTE)[None, :])
    shift = (offs_d % PER_BYTE) * BITS
    return ((byte.to(tl.int32) >> shift[None, :]) & MASK).to(tl.float32)


@triton.jit
def _load_rows_quant(kc, ks, kz, vc, vs, vz, slot, rows, offs_d, D: tl.constexpr, G: tl.constexpr,
                     BITS: tl.constexpr, DT: tl.constexpr, SPLIT: tl.constexpr):
    """A (CHUNK, D) tile dequantized in registers: keys per channel of the block, values per token group."""
    k_scale = tl.load(ks + slot * D + offs_d).to(tl.float32)
    k_zero = tl.load(kz + slot * D + offs_d).to(tl.float32)
    k = _unpack(kc, rows, offs_d, D, BITS, SPLIT) * k_scale[None, :] + k_zero[None, :]
    g_off = rows[:, None] * (D // G) + (offs_d // G)[None, :]
    v_scale = tl.load(vs + g_off).to(tl.float32)
    v_zero = tl.load(vz + g_off).to(tl.float32)
    v = _unpack(vc, rows, offs_d, D, BITS, SPLIT) * v_scale + v_zero
    return k.to(DT), v.to(DT)  # narrow right away: halves the registers the tiles hold


@triton.jit
def _chunk_kv(c, bits_ptr, slot_ptr, fk, fv, sf_r, tk, tv, st_r,
              k8c, k8s, k8z, v8c, v8s, v8z, k4c, k4s, k4z, v4c, v4s, v4z, k2c, k2s, k2z, v2c, v2s, v2z,
              n_hist_chunks, n_tail, offs_n, offs_d, D: tl.constexpr, G: tl.constexpr, BS: tl.constexpr,
              CHUNK: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr, HAS2: tl.constexpr,
              DT: tl.constexpr, SPLIT: tl.constexpr):
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
                k, v = _load_rows_quant(k8c, k8s, k8z, v8c, v8s, v8z, slot, rows, offs_d, D, G, 8, DT, SPLIT)
        if HAS4:
            if bits == 4:
                k, v = _load_rows_quant(k4c, k4s, k4z, v4c, v4s, v4z, slot, rows, offs_d, D, G, 4, DT, SPLIT)
        if HAS2:
            if bits == 2:
                k, v = _load_rows_quant(k2c, k2s, k2z, v2c, v2s, v2z, slot, rows, offs_d, D, G, 2, DT, SPLIT)
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
                  WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, SPLIT: tl.constexpr):
    k, v = _chunk_kv(c, bits_ptr, slot_ptr, fk, fv, sf_r, tk, tv, st_r,
                     k8c, k8s, k8z, v8c, v8s, v8z, k4c, k4s, k4z, v4c, v4s, v4z, k2c, k2s, k2z, v2c, v2s, v2z,
                     n_hist_chunks, n_tail, offs_n, offs_d, D, G, BS, CHUNK, HAS8, HAS4, HAS2, q.dtype, SPLIT)
    pos = c * CHUNK + offs_n
    valid = pos < n_total
    if WINDOW > 0:
        valid = valid & (pos > n_total - 1 - WINDOW)
    if HAS_MASK:
        valid = valid & (tl.load(mask_row + pos, mask=pos < n_total, other=0) != 0)
    return _online_softmax_step(q, k, v, valid, m_i, l_i, acc, qk_scale, softcap, SOFTCAP)


# Lengths change every decode step; left specializable, each new (==1, %16) pattern of them would JIT-compile
# a new variant in the middle of generation.
_PER_STEP_ARGS = ["n_hist_chunks", "n_tail", "n_total", "first_chunk", "chunks_per_split", "n_splits"]


@triton.jit(do_not_specialize=_PER_STEP_ARGS)
def decode_split_kernel(
    q_ptr, sq_b, sq_h,
    bits_ptr, slot_ptr,
    fk_ptr, fv_ptr, sf_b, sf_h, sf_r,
    tk_ptr, tv_ptr, st_b, st_h, st_r,
    k8c, k8s, k8z, v8c, v8s, v8z, s8c_b, s8c_h, s8k_b, s8k_h, s8v_b, s8v_h,
    k4c, k4s, k4z, v4c, v4s, v4z, s4c_b, s4c_h, s4k_b, s4k_h, s4v_b, s4v_h,
    k2c, k2s, k2z, v2c, v2s, v2z, s2c_b, s2c_h, s2k_b, s2k_h, s2v_b, s2v_h,
    mask_ptr, sm_b,
    acc_ptr, m_ptr, l_ptr, lens_ptr,
    n_hist_chunks, n_tail, n_total, first_chunk, chunks_per_split, n_splits, qk_scale, softcap,
    GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BS: tl.constexpr,
    CHUNK: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr, HAS2: tl.constexpr,
    HAS_MASK: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, WHILE_LOOP: tl.constexpr,
    SPLIT_UNPACK: tl.constexpr, DEVICE_LENS: tl.constexpr,
):
    """Partial attention of one (split, kv head, batch): the group's query heads over its chunks.

    DEVICE_LENS: the lengths live on the device (``lens_ptr`` = [history blocks, tail tokens], a static
    cache under CUDA graphs); the host's length arguments are capacities and the chunks are shared out among
    the ``n_splits`` programs here, from the live lengths.
    """
    if DEVICE_LENS:
        n_hist_chunks = tl.load(lens_ptr) * (BS // CHUNK)
        n_tail = tl.load(lens_ptr + 1)
        n_total = n_hist_chunks * CHUNK + n_tail
        chunks_per_split = tl.cdiv(n_hist_chunks + tl.cdiv(n_tail, CHUNK), n_splits)
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
                D, G, BS, CHUNK, HAS8, HAS4, HAS2, HAS_MASK, WINDOW, SOFTCAP, SPLIT_UNPACK)
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
                D, G, BS, CHUNK, HAS8, HAS4, HAS2, HAS_MASK, WINDOW, SOFTCAP, SPLIT_UNPACK)

    row = (b * (tl.num_programs(1) * GROUP) + h * GROUP + offs_g) * n_splits + split  # (B, Hq, splits)
    ok = offs_g < GROUP
    tl.store(m_ptr + row, m_i, mask=ok)
    tl.store(l_ptr + row, l_i, mask=ok)
    tl.store(acc_ptr + row[:, None] * D + offs_d[None, :], acc, mask=ok[:, None])


@triton.jit(do_not_specialize=["n_splits"])
def merge_splits_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, so_b, so_h, n_heads, n_splits,
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
