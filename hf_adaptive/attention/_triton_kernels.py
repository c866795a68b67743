"""Triton kernels of the fused packed-KV decode attention; see :mod:`hf_adaptive.attention.triton_decode`.

Imported only where triton is installed. Stage 1 (``decode_split_kernel``) computes, per (split, kv head,
batch), partial softmax statistics of the KV group's query heads over a contiguous range of logical
chunks; stage 2 (``merge_splits_kernel``) merges the splits with log-sum-exp weights. Under
``TRITON_INTERPRET=1`` the host passes ``F32_DOTS=True``: the interpreter's bf16 dot is broken.

Every tile is handled as two halves of the head dim, channels ``[0, D/2)`` and ``[D/2, D)``, because the packed
layout puts channel j and channel j + D/2 in the same byte (4 bits; 2 bits: j + k·D/4): a half is then one
shift and one mask of contiguous bytes, with no interleaving of fields. Quantized tiles are never dequantized
element by element when the scales allow folding them elsewhere:

- keys (one scale/zero per block and channel): ``q · (c·s + z) = (q·s) · c + q · z``; the query is scaled once
  per chunk and the integer codes, exact in bf16, go straight into the dot;
- values (one scale/zero per token and group of G channels), when a half lies in one group (G ≥ D/2):
  ``p · (c·s + z) = (p·s) · c + p · z``; smaller groups dequantize the tile in registers.

A half narrower than 16 channels (D < 32) is padded to 16 columns with zeros for ``tl.dot``.
"""

import triton
import triton.language as tl

from hf_adaptive.kv import packed
from hf_adaptive.kv.packed import book_offset
from hf_adaptive.ptx_codes import code_lanes_asm

LOG2E = tl.constexpr(1.4426950408889634)
MAGIC = tl.constexpr(8388608.0)  # 2**23
MAGIC_BITS = tl.constexpr(0x4B000000)  # its float32 bit pattern


@triton.jit
def _mm(a, b):
    """``tl.dot`` that keeps float32 operands in float32 (IEEE): the default TF32 rounds them to a 10-bit mantissa,
    which flips near-tied greedy tokens of a float32 model against the same model on an exact cache."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _softmax_fold(s, valid, m_i, l_i, qk_scale, softcap, SOFTCAP: tl.constexpr):
    """Scores (GP, CHUNK) of one tile folded into the running max and sum; returns p, new max, new sum, alpha."""
    s = s * qk_scale
    if SOFTCAP:
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
    s = tl.where(valid[None, :], s * LOG2E, float("-inf"))  # log2 units for exp2
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, m_new, l_i * alpha + tl.sum(p, 1), alpha


@triton.jit
def _rows16_half(base, rows, row_ok, offs_h, stride_row, H: tl.constexpr, HALF: tl.constexpr,
                 DT: tl.constexpr):
    """(CHUNK, HD) half ``H`` of a model-dtype tile (columns past the half read as 0)."""
    ok = row_ok[:, None] & (offs_h < HALF)[None, :]
    return tl.load(base + rows[:, None] * stride_row + (H * HALF + offs_h)[None, :], mask=ok, other=0.0).to(DT)


@triton.jit
def _step16(q_lo, q_hi, k_base, v_base, rows, row_ok, stride_row, valid, m_i, l_i, acc_lo, acc_hi, offs_h,
            qk_scale, softcap, HALF: tl.constexpr, SOFTCAP: tl.constexpr):
    """Fold one tile held in the model dtype (a 16-bit history block or the exact tail)."""
    DT = q_lo.dtype
    k_lo = _rows16_half(k_base, rows, row_ok, offs_h, stride_row, 0, HALF, DT)
    k_hi = _rows16_half(k_base, rows, row_ok, offs_h, stride_row, 1, HALF, DT)
    s = _mm(q_lo, tl.trans(k_lo)) + _mm(q_hi, tl.trans(k_hi))
    p, m_i, l_i, alpha = _softmax_fold(s, valid, m_i, l_i, qk_scale, softcap, SOFTCAP)
    v_lo = _rows16_half(v_base, rows, row_ok, offs_h, stride_row, 0, HALF, DT)
    v_hi = _rows16_half(v_base, rows, row_ok, offs_h, stride_row, 1, HALF, DT)
    pd = p.to(DT)
    acc_lo = acc_lo * alpha[:, None] + _mm(pd, v_lo)
    acc_hi = acc_hi * alpha[:, None] + _mm(pd, v_hi)
    return m_i, l_i, acc_lo, acc_hi


@triton.jit
def _dot_split(a, b, DT: tl.constexpr):
    """float32 ``a`` (M, K) times ``b`` (K, N) held exactly in ``DT``: ``a`` split into a DT head and a DT remainder,
    two dots, so the product keeps about twice DT's mantissa (the integer codes in ``b`` are exact in bf16)."""
    head = a.to(DT)
    return _mm(head, b) + _mm((a - head.to(tl.float32)).to(DT), b)


@triton.jit
def _load_code_halves(base, rows, ok, on, offs_h, D: tl.constexpr, HALF: tl.constexpr, BITS: tl.constexpr,
                      DT: tl.constexpr):
    """Raw loads behind both halves of a packed (CHUNK, D) tile; :func:`_decode_half` finishes them.

    4 bits: byte j = channel j | channel j + D/2 << 4, both halves are the same bytes. 8 bits: each half its own
    bytes. When a half fills the tile and holds a multiple of 4 channels, a 16-bit ``DT`` loads the (CHUNK, HALF)
    bytes as they are (decoded four at a time, :func:`_f16_codes`) and a float32 one loads (CHUNK, HALF / 4) int32
    words (the test is written inline: Triton 3.6 treats a jit helper's boolean as a runtime value). 2 bits (uint8):
    byte j holds channels j + k·D/4; each half gathers the bytes of its channels.
    """
    ROW_BYTES: tl.constexpr = D * BITS // 8
    if (BITS == 4 or BITS == 8) and HALF == offs_h.shape[0] and HALF % 4 == 0 and DT != tl.float32:  # bytes
        row_bytes = base + rows[:, None] * ROW_BYTES
        b_ok = (offs_h < HALF * on)[None, :]
        lo = tl.load(row_bytes + offs_h[None, :], mask=b_ok, other=0)
        hi = lo
        if BITS == 8:
            hi = tl.load(row_bytes + HALF + offs_h[None, :], mask=b_ok, other=0)
    elif (BITS == 4 or BITS == 8) and HALF == offs_h.shape[0] and HALF % 4 == 0:  # words (a constexpr test)
        W: tl.constexpr = HALF // 4
        words = base.to(tl.pointer_type(tl.int32)) + rows[:, None] * (ROW_BYTES // 4)
        offs_w = tl.arange(0, W)
        w_ok = (offs_w < W * on)[None, :]
        lo = tl.load(words + offs_w[None, :], mask=w_ok, other=0)
        hi = lo
        if BITS == 8:
            hi = tl.load(words + W + offs_w[None, :], mask=w_ok, other=0)
    else:
        row_off = rows[:, None] * ROW_BYTES
        lo = tl.load(base + row_off + (offs_h % ROW_BYTES)[None, :], mask=ok, other=0)
        hi = tl.load(base + row_off + ((HALF + offs_h) % ROW_BYTES)[None, :], mask=ok, other=0)
    return lo, hi


def _f16_asm(shift: int, mask: int, dequant: bool) -> tl.constexpr:
    """PTX for :func:`_f16_codes`: four code bytes ($2) to four float16 lanes ($0, $1), optionally times the scale lanes
    ($3, $4) plus the zero lanes ($5, $6)."""
    last = ("fma.rn.f16x2 $0, t, $3, $5;\nfma.rn.f16x2 $1, u, $4, $6;" if dequant else "mov.b32 $0, t;\nmov.b32 $1, u;")
    return tl.constexpr(code_lanes_asm(shift, mask, "f16", "add.f16x2 t, t, off;\nadd.f16x2 u, u, off;\n" + last,
                                       regs=", off", setup="mov.b32 off, 0xE400E400;\n"))  # off: two lanes of -1024


F16_CODES_4LO = _f16_asm(0, 0xF, False)
F16_CODES_4HI = _f16_asm(4, 0xF, False)
F16_CODES_8 = _f16_asm(0, 0xFF, False)
F16_VALUES_4LO = _f16_asm(0, 0xF, True)
F16_VALUES_4HI = _f16_asm(4, 0xF, True)
F16_VALUES_8 = _f16_asm(0, 0xFF, True)


@triton.jit
def _f16_codes(raw, H: tl.constexpr, BITS: tl.constexpr):
    """(CHUNK, HALF) uint8 code bytes to the float16 codes of half ``H``, four bytes per PTX group (GPU builds only;
    the interpreter takes the float32 path).

    Two bytes are spread over the two 16-bit lanes of a register (``prmt``; 4 bits, half 1: shifted down a nibble);
    one ``lop3`` keeps the code field and writes the exponent of 1024 over it, so each lane is the float16 1024 + c
    exactly (c < 1024), and a packed add leaves c: 1.5 instructions per code, where a shift, mask, OR, float
    subtraction and conversion each took 4.5.
    """
    if BITS == 4:
        asm: tl.constexpr = F16_CODES_4LO if H == 0 else F16_CODES_4HI
    else:
        asm: tl.constexpr = F16_CODES_8
    return tl.inline_asm_elementwise(asm, "=r,=r,r", [raw], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _f16_values(raw, scale, zero, H: tl.constexpr, BITS: tl.constexpr):
    """:func:`_f16_codes` times ``scale`` plus ``zero`` (float16 tiles like ``raw``) in one packed fma per two codes,
    one rounding: the float16 of the stored scale and zero exactly."""
    if BITS == 4:
        asm: tl.constexpr = F16_VALUES_4LO if H == 0 else F16_VALUES_4HI
    else:
        asm: tl.constexpr = F16_VALUES_8
    return tl.inline_asm_elementwise(asm, "=r,=r,r,r,r,r,r", [raw, scale, zero], dtype=tl.float16, is_pure=True,
                                     pack=4)


@triton.jit
def _word_columns(words, SHIFT: tl.constexpr, MASK: tl.constexpr, HD: tl.constexpr):
    """(CHUNK, HD / 4) int32 words to (CHUNK, HD) codes: column 4w + i is the ``MASK`` field at bit ``SHIFT`` of
    byte i of word w (little-endian bytes)."""
    u = words.to(tl.uint32, bitcast=True)
    b0 = (u >> SHIFT) & MASK
    b1 = (u >> (SHIFT + 8)) & MASK
    b2 = (u >> (SHIFT + 16)) & MASK
    b3 = (u >> (SHIFT + 24)) & MASK
    # join appends a last axis: (w, inner, outer) flattens to 4w + 2·inner + outer, so b1 / b2 go inner / outer
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (words.shape[0], HD))


@triton.jit
def _decode_half(raw, offs_h, H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BITS: tl.constexpr,
                 DT: tl.constexpr):
    """Codes of half ``H`` (channels ``H * HALF + offs_h``) from its raw loads, in ``DT`` (exact integers)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    ROW_BYTES: tl.constexpr = D * BITS // 8
    if (BITS == 4 or BITS == 8) and HALF == offs_h.shape[0] and HALF % 4 == 0:  # words (a constexpr test)
        codes = _word_columns(raw, 4 * H if BITS == 4 else 0, MASK, offs_h.shape[0])
    else:
        codes = (raw.to(tl.uint32) >> (((H * HALF + offs_h) // ROW_BYTES) * BITS)[None, :]) & MASK
    # integer to float without a conversion instruction (those issue at a quarter of the ALU rate): a code c < 2**23
    # ORed into the mantissa of 2**23 is the float 2**23 + c, and one subtraction leaves c exactly
    return ((codes | MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC).to(DT)


@triton.jit
def _load_quant(kc, ks, kz, vc, vs, vz, slot, rows, on, offs_h, D: tl.constexpr, G: tl.constexpr,
                HALF: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr):
    """Every load of one quantized tile, issued together (``on`` 0 instead of 1: no memory is touched).

    Returns raw key/value code halves, key scale/zero halves (HD,) and the value scales/zeros: per token (CHUNK,)
    for each half when a half lies in one group (G >= D/2), else (CHUNK, HD) tiles.
    """
    col_ok = offs_h < HALF * on
    ok = col_ok[None, :]
    row_ok = rows * 0 < on
    k_lo, k_hi = _load_code_halves(kc, rows, ok, on, offs_h, D, HALF, BITS, DT)
    v_lo, v_hi = _load_code_halves(vc, rows, ok, on, offs_h, D, HALF, BITS, DT)
    ks_lo = tl.load(ks + slot * D + offs_h, mask=col_ok, other=0.0)
    ks_hi = tl.load(ks + slot * D + HALF + offs_h, mask=col_ok, other=0.0)
    kz_lo = tl.load(kz + slot * D + offs_h, mask=col_ok, other=0.0)
    kz_hi = tl.load(kz + slot * D + HALF + offs_h, mask=col_ok, other=0.0)
    if G >= HALF:
        g_off = rows * (D // G)
        vs_lo = tl.load(vs + g_off, mask=row_ok, other=0.0)
        vz_lo = tl.load(vz + g_off, mask=row_ok, other=0.0)
        vs_hi = tl.load(vs + g_off + HALF // G, mask=row_ok, other=0.0)
        vz_hi = tl.load(vz + g_off + HALF // G, mask=row_ok, other=0.0)
    else:
        g_lo = rows[:, None] * (D // G) + (offs_h // G)[None, :]
        g_hi = rows[:, None] * (D // G) + ((HALF + offs_h) // G)[None, :]
        vs_lo = tl.load(vs + g_lo, mask=ok, other=0.0)
        vz_lo = tl.load(vz + g_lo, mask=ok, other=0.0)
        vs_hi = tl.load(vs + g_hi, mask=ok, other=0.0)
        vz_hi = tl.load(vz + g_hi, mask=ok, other=0.0)
    return k_lo, k_hi, v_lo, v_hi, ks_lo, ks_hi, kz_lo, kz_hi, vs_lo, vz_lo, vs_hi, vz_hi


@triton.jit
def _pv_half(p, raw, scale, zero, offs_h, H: tl.constexpr, D: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr,
             BITS: tl.constexpr, DT: tl.constexpr):
    """p (GP, CHUNK) times half ``H`` of a quantized value tile: (GP, HD) float32."""
    codes = _decode_half(raw, offs_h, H, D, HALF, BITS, DT)
    if G >= HALF:  # the half is one group: its per-token scale folds into p, its zero into a row sum
        pv = (_mm((p * scale.to(tl.float32)[None, :]).to(DT), codes)
              + tl.sum(p * zero.to(tl.float32)[None, :], 1)[:, None])
    else:
        v = codes.to(tl.float32) * scale.to(tl.float32) + zero.to(tl.float32)
        pv = _mm(p.to(DT), v.to(DT))
    return pv


@triton.jit
def _per_token(x, like, G: tl.constexpr, HALF: tl.constexpr):
    """Value scales/zeros as a float16 tile shaped ``like``: per token (CHUNK,) broadcast over the half's channels when a
    half lies in one group (G >= D/2), else already (CHUNK, HD)."""
    if G >= HALF:
        out = tl.broadcast_to(x.to(tl.float16)[:, None], like.shape)
    else:
        out = x.to(tl.float16)
    return out


@triton.jit
def _fold_dequant16(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, ks_lo, ks_hi, kz_lo, kz_hi, vs_lo, vz_lo, vs_hi, vz_hi,
                    valid, m_i, l_i, acc_lo, acc_hi, qk_scale, softcap, G: tl.constexpr, HALF: tl.constexpr,
                    BITS: tl.constexpr, SOFTCAP: tl.constexpr):
    """:func:`_fold_quant` for 16-bit models, float16 dots: the key scales fold into the query (one float16 dot per
    half; float16 keeps 11 bits of q · s, more than the bf16 keys of a dequantized cache), the key zeros into a
    per-row constant; the values are dequantized per token in registers (:func:`_f16_values`)."""
    F16: tl.constexpr = tl.float16
    HI: tl.constexpr = 1 if BITS == 4 else 0
    qf_lo = q_lo.to(tl.float32)
    qf_hi = q_hi.to(tl.float32)
    qz = tl.sum(qf_lo * kz_lo.to(tl.float32)[None, :], 1) + tl.sum(qf_hi * kz_hi.to(tl.float32)[None, :], 1)
    s = (tl.dot((qf_lo * ks_lo.to(tl.float32)[None, :]).to(F16), tl.trans(_f16_codes(k_lo, 0, BITS)))
         + tl.dot((qf_hi * ks_hi.to(tl.float32)[None, :]).to(F16), tl.trans(_f16_codes(k_hi, HI, BITS))))
    p, m_i, l_i, alpha = _softmax_fold(s + qz[:, None], valid, m_i, l_i, qk_scale, softcap, SOFTCAP)
    pd = p.to(F16)
    vf_lo = _f16_values(v_lo, _per_token(vs_lo, v_lo, G, HALF), _per_token(vz_lo, v_lo, G, HALF), 0, BITS)
    vf_hi = _f16_values(v_hi, _per_token(vs_hi, v_hi, G, HALF), _per_token(vz_hi, v_hi, G, HALF), HI, BITS)
    acc_lo = acc_lo * alpha[:, None] + tl.dot(pd, vf_lo)
    acc_hi = acc_hi * alpha[:, None] + tl.dot(pd, vf_hi)
    return m_i, l_i, acc_lo, acc_hi


@triton.jit
def _fold_quant(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, ks_lo, ks_hi, kz_lo, kz_hi, vs_lo, vz_lo, vs_hi, vz_hi,
                valid, m_i, l_i, acc_lo, acc_hi, offs_h, qk_scale, softcap, D: tl.constexpr, G: tl.constexpr,
                HALF: tl.constexpr, BITS: tl.constexpr, SOFTCAP: tl.constexpr):
    """Fold one quantized tile from its loads (see :func:`_load_quant`): keys per channel of the block, values per
    token group.

    16-bit models, whole halves of 4/8-bit bytes (:func:`_fold_dequant16`): float16 dots, one per half for the keys,
    values dequantized in registers. Otherwise (float32 models, the interpreter, 2 bits, narrow halves) the integer
    codes go into the dots: the key scale folds into the query (split in two for twice the dtype's mantissa), the
    key zero into a per-row constant, and the value scale/zero into p and a row sum (:func:`_pv_half`).
    """
    DT = q_lo.dtype
    if (BITS == 4 or BITS == 8) and HALF == offs_h.shape[0] and HALF % 4 == 0 and DT != tl.float32:
        m_i, l_i, acc_lo, acc_hi = _fold_dequant16(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, ks_lo, ks_hi, kz_lo, kz_hi,
                                                   vs_lo, vz_lo, vs_hi, vz_hi, valid, m_i, l_i, acc_lo, acc_hi,
                                                   qk_scale, softcap, G, HALF, BITS, SOFTCAP)
    else:
        qf_lo = q_lo.to(tl.float32)
        qf_hi = q_hi.to(tl.float32)
        qz = tl.sum(qf_lo * kz_lo.to(tl.float32)[None, :], 1) + tl.sum(qf_hi * kz_hi.to(tl.float32)[None, :], 1)
        c_lo = tl.trans(_decode_half(k_lo, offs_h, 0, D, HALF, BITS, DT))
        c_hi = tl.trans(_decode_half(k_hi, offs_h, 1, D, HALF, BITS, DT))
        s = (_dot_split(qf_lo * ks_lo.to(tl.float32)[None, :], c_lo, DT)
             + _dot_split(qf_hi * ks_hi.to(tl.float32)[None, :], c_hi, DT))
        p, m_i, l_i, alpha = _softmax_fold(s + qz[:, None], valid, m_i, l_i, qk_scale, softcap, SOFTCAP)
        acc_lo = acc_lo * alpha[:, None] + _pv_half(p, v_lo, vs_lo, vz_lo, offs_h, 0, D, G, HALF, BITS, DT)
        acc_hi = acc_hi * alpha[:, None] + _pv_half(p, v_hi, vs_hi, vz_hi, offs_h, 1, D, G, HALF, BITS, DT)
    return m_i, l_i, acc_lo, acc_hi


@triton.jit
def _step_quant(q_lo, q_hi, kc, ks, kz, vc, vs, vz, slot, rows, valid, m_i, l_i, acc_lo, acc_hi, offs_h,
                qk_scale, softcap, D: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr, BITS: tl.constexpr,
                SOFTCAP: tl.constexpr):
    """Fold one tile of a quantized history block: its loads, then :func:`_fold_quant`."""
    k_lo, k_hi, v_lo, v_hi, ks_lo, ks_hi, kz_lo, kz_hi, vs_lo, vz_lo, vs_hi, vz_hi = _load_quant(
        kc, ks, kz, vc, vs, vz, slot, rows, 1, offs_h, D, G, HALF, BITS, q_lo.dtype)
    return _fold_quant(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, ks_lo, ks_hi, kz_lo, kz_hi, vs_lo, vz_lo, vs_hi, vz_hi,
                       valid, m_i, l_i, acc_lo, acc_hi, offs_h, qk_scale, softcap, D, G, HALF, BITS, SOFTCAP)


@triton.jit
def _valid_keys(pos, n_total, mask_row, HAS_MASK: tl.constexpr, WINDOW: tl.constexpr):
    """Which logical key positions of a tile are attended: stored, inside the window, not masked (padding)."""
    valid = pos < n_total
    if WINDOW > 0:
        valid = valid & (pos > n_total - 1 - WINDOW)
    if HAS_MASK:
        valid = valid & (tl.load(mask_row + pos, mask=pos < n_total, other=0) != 0)
    return valid


@triton.jit
def _attend_chunk(c, q_lo, q_hi, m_i, l_i, acc_lo, acc_hi, bits_ptr, slot_ptr, b, h, tk, tv, st_r,
                  fk, fv, sf_b, sf_h, sf_r,
                  k8c, k8s, k8z, v8c, v8s, v8z, s8c_b, s8c_h, s8k_b, s8k_h, s8v_b, s8v_h,
                  k4c, k4s, k4z, v4c, v4s, v4z, s4c_b, s4c_h, s4k_b, s4k_h, s4v_b, s4v_h,
                  k2c, k2s, k2z, v2c, v2s, v2z, s2c_b, s2c_h, s2k_b, s2k_h, s2v_b, s2v_h,
                  mask_row, n_hist_chunks, n_tail, n_total, qk_scale, softcap, offs_n, offs_h,
                  D: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr, BS: tl.constexpr, CHUNK: tl.constexpr,
                  HAS8: tl.constexpr, HAS4: tl.constexpr, HAS2: tl.constexpr, HAS_MASK: tl.constexpr,
                  WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    """Fold logical chunk ``c`` of a view without a book: a history chunk through the block table, or the exact tail.

    ``tk``/``tv`` are offset to this program's (batch ``b``, kv head ``h``) plane; a history pool's pointers are
    offset to the plane only inside the branch of the chunk's precision, so no pool's pointers occupy registers
    across the loop.
    """
    valid = _valid_keys(c * CHUNK + offs_n, n_total, mask_row, HAS_MASK, WINDOW)
    CPB: tl.constexpr = BS // CHUNK
    if c < n_hist_chunks:
        bits = tl.load(bits_ptr + c // CPB)
        slot = tl.load(slot_ptr + c // CPB)
        rows = slot * BS + (c % CPB) * CHUNK + offs_n
        if bits == 16:
            m_i, l_i, acc_lo, acc_hi = _step16(q_lo, q_hi, fk + b * sf_b + h * sf_h, fv + b * sf_b + h * sf_h, rows,
                                               offs_n < CHUNK, sf_r, valid, m_i, l_i, acc_lo, acc_hi, offs_h,
                                               qk_scale, softcap, HALF, SOFTCAP)
        if HAS8:
            if bits == 8:
                m_i, l_i, acc_lo, acc_hi = _step_pool(
                    q_lo, q_hi, b, h, k8c, k8s, k8z, v8c, v8s, v8z, s8c_b, s8c_h, s8k_b, s8k_h,
                    s8v_b, s8v_h, slot, rows, valid, m_i, l_i, acc_lo, acc_hi, offs_h, qk_scale, softcap,
                    D, G, HALF, 8, SOFTCAP)
        if HAS4:
            if bits == 4:
                m_i, l_i, acc_lo, acc_hi = _step_pool(
                    q_lo, q_hi, b, h, k4c, k4s, k4z, v4c, v4s, v4z, s4c_b, s4c_h, s4k_b, s4k_h,
                    s4v_b, s4v_h, slot, rows, valid, m_i, l_i, acc_lo, acc_hi, offs_h, qk_scale, softcap,
                    D, G, HALF, 4, SOFTCAP)
        if HAS2:
            if bits == 2:
                m_i, l_i, acc_lo, acc_hi = _step_pool(
                    q_lo, q_hi, b, h, k2c, k2s, k2z, v2c, v2s, v2z, s2c_b, s2c_h, s2k_b, s2k_h,
                    s2v_b, s2v_h, slot, rows, valid, m_i, l_i, acc_lo, acc_hi, offs_h, qk_scale, softcap,
                    D, G, HALF, 2, SOFTCAP)
    else:
        t_rows = (c - n_hist_chunks) * CHUNK + offs_n
        m_i, l_i, acc_lo, acc_hi = _step16(q_lo, q_hi, tk, tv, t_rows, t_rows < n_tail, st_r, valid, m_i, l_i,
                                           acc_lo, acc_hi, offs_h, qk_scale, softcap, HALF, SOFTCAP)
    return m_i, l_i, acc_lo, acc_hi


@triton.jit
def _step_pool(q_lo, q_hi, b, h, kc, ks, kz, vc, vs, vz, sc_b, sc_h, sk_b, sk_h, sv_b, sv_h, slot, rows,
               valid, m_i, l_i, acc_lo, acc_hi, offs_h, qk_scale, softcap, D: tl.constexpr, G: tl.constexpr,
               HALF: tl.constexpr, BITS: tl.constexpr, SOFTCAP: tl.constexpr):
    """:func:`_step_quant` on one precision's pool, offset to the (``b``, ``h``) plane."""
    return _step_quant(q_lo, q_hi, kc + b * sc_b + h * sc_h, ks + b * sk_b + h * sk_h, kz + b * sk_b + h * sk_h,
                       vc + b * sc_b + h * sc_h, vs + b * sv_b + h * sv_h, vz + b * sv_b + h * sv_h, slot, rows,
                       valid, m_i, l_i, acc_lo, acc_hi, offs_h, qk_scale, softcap, D, G, HALF, BITS, SOFTCAP)


BOOK_SIZE: tl.constexpr = tl.constexpr(packed.BOOK_SIZE)
TABLE_ROWS: tl.constexpr = tl.constexpr(packed.BOOK_TABLE_ROWS)
GROUP16: tl.constexpr = tl.constexpr(packed.BOOK_GROUPS.index(16))
GROUP8: tl.constexpr = tl.constexpr(packed.BOOK_GROUPS.index(8))
GROUP4: tl.constexpr = tl.constexpr(packed.BOOK_GROUPS.index(4))
GROUP2: tl.constexpr = tl.constexpr(packed.BOOK_GROUPS.index(2))
BOOK8: tl.constexpr = tl.constexpr(book_offset(8))
BOOK4: tl.constexpr = tl.constexpr(book_offset(4))
BOOK2: tl.constexpr = tl.constexpr(book_offset(2))


@triton.jit
def _group_range(starts, g, c_lo, c_hi, n_hist_chunks, CPB: tl.constexpr):
    """The chunks of precision group ``g`` (virtual indices: grouped entry x chunks per block) inside [c_lo, c_hi)."""
    g_lo = tl.minimum(tl.load(starts + g) * CPB, n_hist_chunks)
    g_hi = tl.minimum(tl.load(starts + g + 1) * CPB, n_hist_chunks)
    return tl.maximum(g_lo, c_lo), tl.minimum(g_hi, c_hi)


@triton.jit
def _grouped_rows(c, gslot, glog, mask_row, n_total, offs_n, BS: tl.constexpr, CHUNK: tl.constexpr,
                  HAS_MASK: tl.constexpr):
    """Slot and pool rows of virtual chunk ``c`` of a precision group, and which of its keys are attended (history blocks are
    full: only a padding mask, read at the block's logical positions, leaves keys out)."""
    CPB: tl.constexpr = BS // CHUNK
    within = (c % CPB) * CHUNK + offs_n
    slot = tl.load(gslot + c // CPB)
    if HAS_MASK:
        valid = _valid_keys(tl.load(glog + c // CPB) * BS + within, n_total, mask_row, HAS_MASK, 0)
    else:
        valid = offs_n < CHUNK
    return slot, slot * BS + within, valid


@triton.jit
def _block_keys(log_block, c, mask_row, n_total, offs_n, BS: tl.constexpr, CHUNK: tl.constexpr):
    """The padding mask's bytes behind virtual chunk ``c`` (given its block's logical index), 0 past ``n_total``: raw
    int8, so a prefetch carries the load itself and the comparison waits for it only where the keys are used."""
    pos = log_block * BS + (c % (BS // CHUNK)) * CHUNK + offs_n
    return tl.load(mask_row.to(tl.pointer_type(tl.int8)) + pos, mask=pos < n_total, other=0)


@triton.jit
def _first_keys(lo, hi, glog, mask_row, n_total, offs_n, BS: tl.constexpr, CHUNK: tl.constexpr,
                HAS_MASK: tl.constexpr):
    """Start of a walk's mask prefetch over chunks [lo, hi): chunk ``lo``'s mask bytes (nonzero = attended) and the
    logical block of chunk ``lo + 1`` (clamped to the range). Without a mask every key of a history chunk is
    attended."""
    CPB: tl.constexpr = BS // CHUNK
    keys = (offs_n < CHUNK).to(tl.int8)
    log_n = lo * 0
    if HAS_MASK:  # indices clamped into the table: an empty range still reads inside the book
        keys = _block_keys(tl.load(glog + tl.maximum(tl.minimum(lo, hi - 1), 0) // CPB), lo, mask_row, n_total,
                           offs_n, BS, CHUNK)
        log_n = tl.load(glog + tl.maximum(tl.minimum(lo + 1, hi - 1), 0) // CPB)
    return keys, log_n


@triton.jit
def _next_keys(c, hi, log_n, keys, glog, mask_row, n_total, offs_n, BS: tl.constexpr, CHUNK: tl.constexpr,
               HAS_MASK: tl.constexpr):
    """One step of the mask prefetch, issued while chunk ``c`` is folded: chunk ``c + 1``'s mask bytes (from the block
    index loaded a step earlier) and the logical block of chunk ``c + 2``.

    Triton's pipeliner copies the code tiles ahead but not the mask (it feeds no dot); loaded and compared in the
    chunk that reads it, every chunk of a masked walk (``model.generate`` always passes a mask) would wait a memory
    round trip."""
    if HAS_MASK:
        keys = _block_keys(log_n, tl.minimum(c + 1, hi - 1), mask_row, n_total, offs_n, BS, CHUNK)
        log_n = tl.load(glog + tl.minimum(c + 2, hi - 1) // (BS // CHUNK))
    return keys, log_n


@triton.jit
def _scales(ks, kz, vs, vz, slot, rows, offs_h, D: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr):
    """Key scale/zero halves (HD,) of block ``slot`` and per-token value scale/zero halves (CHUNK,) of ``rows``: the
    loads of a quantized tile besides its codes, for whole halves (HD == D/2) each one value group (G >= D/2)."""
    ks_lo = tl.load(ks + slot * D + offs_h)
    ks_hi = tl.load(ks + slot * D + HALF + offs_h)
    kz_lo = tl.load(kz + slot * D + offs_h)
    kz_hi = tl.load(kz + slot * D + HALF + offs_h)
    g_off = rows * (D // G)
    vs_lo = tl.load(vs + g_off)
    vz_lo = tl.load(vz + g_off)
    vs_hi = tl.load(vs + g_off + HALF // G)
    vz_hi = tl.load(vz + g_off + HALF // G)
    return ks_lo, ks_hi, kz_lo, kz_hi, vs_lo, vz_lo, vs_hi, vz_hi


@triton.jit
def _walk_quant_group(lo, hi, q_lo, q_hi, m_i, l_i, acc_lo, acc_hi, entry, b, h, gslot, glog, mask_row, n_total,
                      qk_scale, softcap, offs_n, offs_h, D: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr,
                      BS: tl.constexpr, CHUNK: tl.constexpr, BITS: tl.constexpr, HAS_MASK: tl.constexpr,
                      SOFTCAP: tl.constexpr):
    """Fold chunks [lo, hi) of one quantized precision: one pool, no branch in the loop.

    Triton pipelines the code tiles (copied ahead to shared memory). The scales and zeros it declines (they feed
    dot operands through a layout change, or row sums), so the loop carries them itself: chunk c + 1's are loaded
    while chunk c is folded, from a slot looked up one more chunk ahead. Halves narrower than a tile or split into
    several value groups take the per-chunk loads of :func:`_step_quant`.
    """
    kc, ks, kz, vc, vs, vz = _book_quant(entry, b, h)
    CPB: tl.constexpr = BS // CHUNK
    if (G >= HALF) and (HALF == offs_h.shape[0]):
        if lo < hi:
            slot = tl.load(gslot + lo // CPB)
            slot_n = tl.load(gslot + tl.minimum(lo + 1, hi - 1) // CPB)
            ks_lo, ks_hi, kz_lo, kz_hi, vs_lo, vz_lo, vs_hi, vz_hi = _scales(
                ks, kz, vs, vz, slot, slot * BS + (lo % CPB) * CHUNK + offs_n, offs_h, D, G, HALF)
            keys, log_n = _first_keys(lo, hi, glog, mask_row, n_total, offs_n, BS, CHUNK, HAS_MASK)
            for c in range(lo, hi):
                slot_nn = tl.load(gslot + tl.minimum(c + 2, hi - 1) // CPB)
                cn = tl.minimum(c + 1, hi - 1)
                nks_lo, nks_hi, nkz_lo, nkz_hi, nvs_lo, nvz_lo, nvs_hi, nvz_hi = _scales(
                    ks, kz, vs, vz, slot_n, slot_n * BS + (cn % CPB) * CHUNK + offs_n, offs_h, D, G, HALF)
                keys_n, log_n = _next_keys(c, hi, log_n, keys, glog, mask_row, n_total, offs_n, BS, CHUNK,
                                           HAS_MASK)
                _, rows, _ = _grouped_rows(c, gslot, glog, mask_row, n_total, offs_n, BS, CHUNK, False)
                valid = keys != 0
                k_lo, k_hi = _load_code_halves(kc, rows, offs_h[None, :] < HALF, 1, offs_h, D, HALF, BITS, q_lo.dtype)
                v_lo, v_hi = _load_code_halves(vc, rows, offs_h[None, :] < HALF, 1, offs_h, D, HALF, BITS, q_lo.dtype)
                m_i, l_i, acc_lo, acc_hi = _fold_quant(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, ks_lo, ks_hi, kz_lo, kz_hi,
                                                       vs_lo, vz_lo, vs_hi, vz_hi, valid, m_i, l_i, acc_lo, acc_hi,
                                                       offs_h, qk_scale, softcap, D, G, HALF, BITS, SOFTCAP)
                ks_lo, ks_hi, kz_lo, kz_hi, vs_lo, vz_lo, vs_hi, vz_hi = (nks_lo, nks_hi, nkz_lo, nkz_hi, nvs_lo,
                                                                          nvz_lo, nvs_hi, nvz_hi)
                slot_n = slot_nn
                keys = keys_n
    else:
        for c in range(lo, hi):
            slot, rows, valid = _grouped_rows(c, gslot, glog, mask_row, n_total, offs_n, BS, CHUNK, HAS_MASK)
            m_i, l_i, acc_lo, acc_hi = _step_quant(q_lo, q_hi, kc, ks, kz, vc, vs, vz, slot, rows, valid, m_i,
                                                   l_i, acc_lo, acc_hi, offs_h, qk_scale, softcap, D, G, HALF, BITS,
                                                   SOFTCAP)
    return m_i, l_i, acc_lo, acc_hi


@triton.jit
def _walk_groups(c_lo, c_hi, q_lo, q_hi, m_i, l_i, acc_lo, acc_hi, book, book_blocks, b, h, like_ptr, mask_row,
                 n_hist_chunks, n_total, qk_scale, softcap, offs_n, offs_h, D: tl.constexpr, G: tl.constexpr,
                 HALF: tl.constexpr, BS: tl.constexpr, CHUNK: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr,
                 HAS2: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr):
    """The history chunks of [c_lo, c_hi) through the book's grouped table (``kv.packed.book_table``): each precision
    present in its own loop, 16 bits first (virtual chunk order: the groups one after another)."""
    CPB: tl.constexpr = BS // CHUNK
    gslot = book + BOOK_SIZE + 2 * book_blocks
    glog = gslot + book_blocks
    starts = book + BOOK_SIZE + TABLE_ROWS * book_blocks
    lo, hi = _group_range(starts, GROUP16, c_lo, c_hi, n_hist_chunks, CPB)
    fk, fv, sf_r = _book_rows16(book, like_ptr, b, h)
    keys, log_n = _first_keys(lo, hi, glog, mask_row, n_total, offs_n, BS, CHUNK, HAS_MASK)
    for c in range(lo, hi):
        keys_n, log_n = _next_keys(c, hi, log_n, keys, glog, mask_row, n_total, offs_n, BS, CHUNK, HAS_MASK)
        _, rows, _ = _grouped_rows(c, gslot, glog, mask_row, n_total, offs_n, BS, CHUNK, False)
        m_i, l_i, acc_lo, acc_hi = _step16(q_lo, q_hi, fk, fv, rows, offs_n < CHUNK, sf_r, keys != 0, m_i, l_i,
                                           acc_lo, acc_hi, offs_h, qk_scale, softcap, HALF, SOFTCAP)
        keys = keys_n
    if HAS8:
        lo, hi = _group_range(starts, GROUP8, c_lo, c_hi, n_hist_chunks, CPB)
        m_i, l_i, acc_lo, acc_hi = _walk_quant_group(lo, hi, q_lo, q_hi, m_i, l_i, acc_lo, acc_hi, book + BOOK8, b, h,
                                                     gslot, glog, mask_row, n_total, qk_scale, softcap, offs_n,
                                                     offs_h, D, G, HALF, BS, CHUNK, 8, HAS_MASK, SOFTCAP)
    if HAS4:
        lo, hi = _group_range(starts, GROUP4, c_lo, c_hi, n_hist_chunks, CPB)
        m_i, l_i, acc_lo, acc_hi = _walk_quant_group(lo, hi, q_lo, q_hi, m_i, l_i, acc_lo, acc_hi, book + BOOK4, b, h,
                                                     gslot, glog, mask_row, n_total, qk_scale, softcap, offs_n,
                                                     offs_h, D, G, HALF, BS, CHUNK, 4, HAS_MASK, SOFTCAP)
    if HAS2:
        lo, hi = _group_range(starts, GROUP2, c_lo, c_hi, n_hist_chunks, CPB)
        m_i, l_i, acc_lo, acc_hi = _walk_quant_group(lo, hi, q_lo, q_hi, m_i, l_i, acc_lo, acc_hi, book + BOOK2, b, h,
                                                     gslot, glog, mask_row, n_total, qk_scale, softcap, offs_n,
                                                     offs_h, D, G, HALF, BS, CHUNK, 2, HAS_MASK, SOFTCAP)
    return m_i, l_i, acc_lo, acc_hi


@triton.jit
def _aligned(ptr, stride_b, stride_h, b, h, ALIGN: tl.constexpr):
    """``ptr`` offset to the (``b``, ``h``) plane, with the 16-byte alignment the book's writer checked
    (``kv.packed.book_entries``) made known to Triton: a pointer read from memory carries no alignment, and without it
    every load is split into element-wide accesses that Triton's pipeliner also declines to prefetch."""
    return tl.multiple_of(ptr + tl.multiple_of(stride_b, ALIGN) * b + tl.multiple_of(stride_h, ALIGN) * h, 16)


@triton.jit
def _book_rows16(book, like_ptr, b, h):
    """The 16-bit pool's key/value planes (the model dtype, as ``like_ptr``) and row stride from a book."""
    ty = tl.pointer_type(like_ptr.dtype.element_ty)
    ALIGN: tl.constexpr = 128 // like_ptr.dtype.element_ty.primitive_bitwidth  # elements per 16 bytes
    sf_b, sf_h = tl.load(book + 2), tl.load(book + 3)
    return (_aligned(tl.load(book).to(ty), sf_b, sf_h, b, h, ALIGN),
            _aligned(tl.load(book + 1).to(ty), sf_b, sf_h, b, h, ALIGN), tl.multiple_of(tl.load(book + 4), ALIGN))


@triton.jit
def _book_quant(entry, b, h):
    """One precision's six pool planes from its run of book entries (``kv.packed.BOOK_QUANT``): key codes, scales and
    zeros, value codes, scales and zeros, offset to the (``b``, ``h``) plane."""
    u8 = tl.pointer_type(tl.uint8)
    f16 = tl.pointer_type(tl.float16)
    sc_b, sc_h, sk_b, sk_h, sv_b, sv_h = (tl.load(entry + 6), tl.load(entry + 7), tl.load(entry + 8),
                                          tl.load(entry + 9), tl.load(entry + 10), tl.load(entry + 11))
    return (_aligned(tl.load(entry).to(u8), sc_b, sc_h, b, h, 16),
            _aligned(tl.load(entry + 1).to(f16), sk_b, sk_h, b, h, 8),
            _aligned(tl.load(entry + 2).to(f16), sk_b, sk_h, b, h, 8),
            _aligned(tl.load(entry + 3).to(u8), sc_b, sc_h, b, h, 16),
            _aligned(tl.load(entry + 4).to(f16), sv_b, sv_h, b, h, 8),
            _aligned(tl.load(entry + 5).to(f16), sv_b, sv_h, b, h, 8))


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
    acc_ptr, m_ptr, l_ptr, lens_ptr, book_ptr, book_blocks,
    n_hist_chunks, n_tail, n_total, first_chunk, chunks_per_split, n_splits, qk_scale, softcap,
    GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, HD: tl.constexpr, G: tl.constexpr, BS: tl.constexpr,
    CHUNK: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr, HAS2: tl.constexpr,
    HAS_MASK: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, F32_DOTS: tl.constexpr,
    DEVICE_LENS: tl.constexpr, BOOK: tl.constexpr,
):
    """Partial attention of one (split, kv head, batch): the group's query heads over its chunks.

    HD: columns of a half tile, max(16, D // 2). DEVICE_LENS: the lengths live on the device (``lens_ptr`` =
    [history blocks, tail tokens], a static cache under CUDA graphs); the host's length arguments are capacities
    and the chunks are shared out among the ``n_splits`` programs here, from the live lengths. BOOK: the block
    table and the 16-bit and quantized history storage are found through the address book at ``book_ptr``
    (``kv.packed.PoolBook``: int64 pointers and strides, then the ``book_blocks``-long table rows and the group
    starts, ``kv.packed.book_table``), and the matching pointer and stride arguments are placeholders. A book's
    history is walked by precision group (:func:`_walk_groups`, loops without branches whose loads Triton pipelines);
    a view without one in logical order, branching per chunk on its precision (:func:`_attend_chunk`).
    """
    HALF: tl.constexpr = D // 2
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
    offs_h = tl.arange(0, HD)
    # (GP, HD) halves of the group's query heads; rows past GROUP pad tl.dot's 16-row minimum
    q_ok = (offs_g < GROUP)[:, None] & (offs_h < HALF)[None, :]
    q_off = b * sq_b + (h * GROUP + offs_g)[:, None] * sq_h + offs_h[None, :]
    q_lo = tl.load(q_ptr + q_off, mask=q_ok, other=0.0)
    q_hi = tl.load(q_ptr + q_off + HALF, mask=q_ok, other=0.0)
    if F32_DOTS:  # on GPU the dots run in the model dtype; the interpreter's bf16 dot is broken
        q_lo = q_lo.to(tl.float32)
        q_hi = q_hi.to(tl.float32)
    m_i = tl.full([GP], -1.0e30, tl.float32)  # finite: a fully masked chunk then adds exp2(-inf) = 0
    l_i = tl.zeros([GP], tl.float32)
    acc_lo = tl.zeros([GP, HD], tl.float32)
    acc_hi = tl.zeros([GP, HD], tl.float32)
    tk, tv = tk_ptr + b * st_b + h * st_h, tv_ptr + b * st_b + h * st_h
    mask_row = mask_ptr + b * sm_b
    # splits tile [first_chunk, n_chunks): chunks before a sliding window's start are never read
    c_lo = first_chunk + split * chunks_per_split
    c_hi = tl.minimum(c_lo + chunks_per_split, n_hist_chunks + tl.cdiv(n_tail, CHUNK))
    if BOOK:  # precision groups, each walked without branches, then the tail
        m_i, l_i, acc_lo, acc_hi = _walk_groups(
            c_lo, c_hi, q_lo, q_hi, m_i, l_i, acc_lo, acc_hi, book_ptr, book_blocks, b, h, fk_ptr, mask_row,
            n_hist_chunks, n_total, qk_scale, softcap, offs_n, offs_h, D, G, HALF, BS, CHUNK, HAS8, HAS4, HAS2,
            HAS_MASK, SOFTCAP)
        for c in range(tl.maximum(c_lo, n_hist_chunks), c_hi):
            t_rows = (c - n_hist_chunks) * CHUNK + offs_n
            m_i, l_i, acc_lo, acc_hi = _step16(
                q_lo, q_hi, tk, tv, t_rows, t_rows < n_tail, st_r, _valid_keys(c * CHUNK + offs_n, n_total, mask_row,
                                                                                HAS_MASK, 0),
                m_i, l_i, acc_lo, acc_hi, offs_h, qk_scale, softcap, HALF, SOFTCAP)
    else:
        for c in range(c_lo, c_hi):
            m_i, l_i, acc_lo, acc_hi = _attend_chunk(
                c, q_lo, q_hi, m_i, l_i, acc_lo, acc_hi, bits_ptr, slot_ptr, b, h, tk, tv, st_r,
                fk_ptr, fv_ptr, sf_b, sf_h, sf_r,
                k8c, k8s, k8z, v8c, v8s, v8z, s8c_b, s8c_h, s8k_b, s8k_h, s8v_b, s8v_h,
                k4c, k4s, k4z, v4c, v4s, v4z, s4c_b, s4c_h, s4k_b, s4k_h, s4v_b, s4v_h,
                k2c, k2s, k2z, v2c, v2s, v2z, s2c_b, s2c_h, s2k_b, s2k_h, s2v_b, s2v_h,
                mask_row, n_hist_chunks, n_tail, n_total, qk_scale, softcap, offs_n, offs_h,
                D, G, HALF, BS, CHUNK, HAS8, HAS4, HAS2, HAS_MASK, WINDOW, SOFTCAP)

    row = (b * (tl.num_programs(1) * GROUP) + h * GROUP + offs_g) * n_splits + split  # (B, Hq, splits)
    ok = offs_g < GROUP
    tl.store(m_ptr + row, m_i, mask=ok)
    tl.store(l_ptr + row, l_i, mask=ok)
    out_ok = ok[:, None] & (offs_h < HALF)[None, :]
    tl.store(acc_ptr + row[:, None] * D + offs_h[None, :], acc_lo, mask=out_ok)
    tl.store(acc_ptr + row[:, None] * D + HALF + offs_h[None, :], acc_hi, mask=out_ok)


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
