"""Triton kernels of the int4 weight-only matmul; see :mod:`hf_adaptive.precision.int4_triton`.

Imported only where triton is installed. Layout (one byte per weight pair): ``q`` is (K, N/2) uint8 whose
low nibble is output column ``j`` and high nibble column ``j + N/2``; ``s`` and ``z`` are (K/G, N) scale and
shifted zero, so a weight is ``code * s + z``. A byte row of ``BLOCK_J`` pairs is contiguous, so a tile
load is coalesced along N and each byte is read once for both of its columns.

- ``int4_gemv_kernel`` (one activation row, the decode step): grid (pair blocks, K splits); each program
  accumulates ``x[k] * w[k, j]`` elementwise over its K range (no per-iteration reduction), reduces once,
  then stores, or atomically adds when K is split.
- ``int4_mm_kernel`` (several rows): dequantizes the tile in registers and uses ``tl.dot``.
- ``int4_code_dot_kernel`` (1 to 16 rows): multiplies the raw codes on tensor cores and applies each group's scale
  and zero once per output after its dot, ``y = sum_g s_g * (x_g . c_g) + z_g * sum(x_g)``; the codes become bfloat16
  in PTX, two per instruction pair (``prmt`` spreads bytes to 16-bit lanes, one ``lop3`` writes the exponent of 128
  over each code field, one packed fma leaves the code), so a code costs about 1.5 instructions where the
  elementwise kernel spends four fp32 operations on it. Grid (pair blocks, K splits) as the gemv.

Under ``TRITON_INTERPRET=1`` the host passes float32 dots (``DOT_DT``): the interpreter's bf16 dot is broken.
"""

import triton
import triton.language as tl

from hf_adaptive.ptx_codes import code_lanes_asm


@triton.jit
def _dequant_pair(q_ptr, s_ptr, z_ptr, k0, offs_k, offs_j, j_ok, n_half, stride_q, stride_s, G: tl.constexpr):
    """(BLOCK_K, BLOCK_J) float32 weights of columns ``offs_j`` (low nibbles) and ``offs_j + N/2`` (high)."""
    rows = k0 + offs_k
    byte = tl.load(q_ptr + rows[:, None] * stride_q + offs_j[None, :], mask=j_ok[None, :], other=0).to(tl.int32)
    g = k0 // G  # a K tile never straddles a group (BLOCK_K divides G)
    s_lo = tl.load(s_ptr + g * stride_s + offs_j, mask=j_ok, other=0.0).to(tl.float32)
    s_hi = tl.load(s_ptr + g * stride_s + n_half + offs_j, mask=j_ok, other=0.0).to(tl.float32)
    z_lo = tl.load(z_ptr + g * stride_s + offs_j, mask=j_ok, other=0.0).to(tl.float32)
    z_hi = tl.load(z_ptr + g * stride_s + n_half + offs_j, mask=j_ok, other=0.0).to(tl.float32)
    lo = (byte & 15).to(tl.float32) * s_lo[None, :] + z_lo[None, :]
    hi = (byte >> 4).to(tl.float32) * s_hi[None, :] + z_hi[None, :]
    return lo, hi


@triton.jit
def _gemv_tile(x_ptr, q_ptr, s_ptr, z_ptr, k0, offs_k, offs_j, j_ok, n_half, stride_q, stride_s, acc_lo, acc_hi,
               G: tl.constexpr):
    x = tl.load(x_ptr + k0 + offs_k).to(tl.float32)
    lo, hi = _dequant_pair(q_ptr, s_ptr, z_ptr, k0, offs_k, offs_j, j_ok, n_half, stride_q, stride_s, G)
    return acc_lo + x[:, None] * lo, acc_hi + x[:, None] * hi


@triton.jit
def int4_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, n_half, iters_per_split, stride_q, stride_s,
                     G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr, ATOMIC: tl.constexpr):
    """y (1, N) = x (1, K) @ W.T for one row; ATOMIC: y is float32 zeros and K is split over programs."""
    pid_j = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = offs_j < n_half
    offs_k = tl.arange(0, BLOCK_K)
    acc_lo = tl.zeros([BLOCK_K, BLOCK_J], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_K, BLOCK_J], dtype=tl.float32)
    k_first = pid_s * iters_per_split * BLOCK_K
    for i in range(iters_per_split):
        acc_lo, acc_hi = _gemv_tile(x_ptr, q_ptr, s_ptr, z_ptr, k_first + i * BLOCK_K, offs_k, offs_j, j_ok,
                                    n_half, stride_q, stride_s, acc_lo, acc_hi, G)
    y_lo = tl.sum(acc_lo, axis=0)
    y_hi = tl.sum(acc_hi, axis=0)
    if ATOMIC:
        tl.atomic_add(y_ptr + offs_j, y_lo, mask=j_ok)
        tl.atomic_add(y_ptr + n_half + offs_j, y_hi, mask=j_ok)
    else:
        tl.store(y_ptr + offs_j, y_lo.to(y_ptr.dtype.element_ty), mask=j_ok)
        tl.store(y_ptr + n_half + offs_j, y_hi.to(y_ptr.dtype.element_ty), mask=j_ok)


@triton.jit
def _mm_tile(x_ptr, q_ptr, s_ptr, z_ptr, k0, offs_m, m_ok, offs_k, offs_j, j_ok, n_half, stride_xm, stride_q,
             stride_s, acc_lo, acc_hi, G: tl.constexpr, DOT_DT: tl.constexpr):
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_ok[:, None], other=0.0)
    x = x.to(DOT_DT)
    lo, hi = _dequant_pair(q_ptr, s_ptr, z_ptr, k0, offs_k, offs_j, j_ok, n_half, stride_q, stride_s, G)
    return tl.dot(x, lo.to(DOT_DT), acc_lo), tl.dot(x, hi.to(DOT_DT), acc_hi)


@triton.jit
def int4_mm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, n_half, iters, stride_xm, stride_ym, stride_q, stride_s,
                   G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
                   DOT_DT: tl.constexpr):
    """y (M, N) = x (M, K) @ W.T; grid (pair blocks, row blocks); DOT_DT: the tl.dot input dtype."""
    pid_j = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = offs_j < n_half
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    acc_lo = tl.zeros([BLOCK_M, BLOCK_J], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_M, BLOCK_J], dtype=tl.float32)
    for i in range(iters):
        acc_lo, acc_hi = _mm_tile(x_ptr, q_ptr, s_ptr, z_ptr, i * BLOCK_K, offs_m, m_ok, offs_k, offs_j, j_ok,
                                  n_half, stride_xm, stride_q, stride_s, acc_lo, acc_hi, G, DOT_DT)
    out = y_ptr + offs_m[:, None] * stride_ym + offs_j[None, :]
    ok = m_ok[:, None] & j_ok[None, :]
    tl.store(out, acc_lo.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(out + n_half, acc_hi.to(y_ptr.dtype.element_ty), mask=ok)


def _bf16_codes_asm(shift: int) -> tl.constexpr:
    """PTX: four code bytes ($2) to the bfloat16 codes of their low (shift 0) or high (shift 4) nibbles ($0, $1);
    the lanes hold 128 + c, and 1 * lane - 128 leaves c (sm_80 has no packed bfloat16 add)."""
    tail = "fma.rn.bf16x2 $0, t, one, neg;\nfma.rn.bf16x2 $1, u, one, neg;"
    return tl.constexpr(code_lanes_asm(shift, 0xF, "bf16", tail, regs=", one, neg",
                                       setup="mov.b32 one, 0x3F803F80;\nmov.b32 neg, 0xC300C300;\n"))


BF16_CODES_LO = _bf16_codes_asm(0)
BF16_CODES_HI = _bf16_codes_asm(4)


@triton.jit
def _pair_codes(raw, HI: tl.constexpr, ASM: tl.constexpr, DOT_DT: tl.constexpr):
    """(BLOCK_K, BLOCK_J) code bytes to the ``DOT_DT`` codes of the low (HI False) or high nibbles; ASM: in PTX
    (GPU builds), else by integer arithmetic (the interpreter)."""
    if ASM:
        asm: tl.constexpr = BF16_CODES_HI if HI else BF16_CODES_LO
        return tl.inline_asm_elementwise(asm, "=r,=r,r", [raw], dtype=tl.bfloat16, is_pure=True, pack=4)
    else:
        codes = (raw.to(tl.int32) >> 4) if HI else (raw.to(tl.int32) & 15)
        return codes.to(tl.float32).to(DOT_DT)


@triton.jit
def int4_code_dot_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, n_half, groups_per_split, stride_xm, stride_ym,
                         stride_q, stride_s, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_J: tl.constexpr, ATOMIC: tl.constexpr, ASM: tl.constexpr, DOT_DT: tl.constexpr):
    """y (M <= BLOCK_M, N) = x @ W.T from code dots; grid (pair blocks, K splits of ``groups_per_split`` groups).
    ATOMIC: y is float32 zeros and the splits add into it. BLOCK_K divides G."""
    pid_j = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = offs_j < n_half
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    acc_lo = tl.zeros([BLOCK_M, BLOCK_J], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_M, BLOCK_J], dtype=tl.float32)
    for i in range(groups_per_split):
        g = pid_s * groups_per_split + i
        dot_lo = tl.zeros([BLOCK_M, BLOCK_J], dtype=tl.float32)
        dot_hi = tl.zeros([BLOCK_M, BLOCK_J], dtype=tl.float32)
        x_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for t in tl.static_range(G // BLOCK_K):
            rows = g * G + t * BLOCK_K + offs_k
            raw = tl.load(q_ptr + rows[:, None] * stride_q + offs_j[None, :], mask=j_ok[None, :], other=0)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :], mask=m_ok[:, None], other=0.0)
            x_sum += tl.sum(x.to(tl.float32), axis=1)
            x = x.to(DOT_DT)
            dot_lo = tl.dot(x, _pair_codes(raw, False, ASM, DOT_DT), dot_lo)
            dot_hi = tl.dot(x, _pair_codes(raw, True, ASM, DOT_DT), dot_hi)
        s_lo = tl.load(s_ptr + g * stride_s + offs_j, mask=j_ok, other=0.0).to(tl.float32)
        s_hi = tl.load(s_ptr + g * stride_s + n_half + offs_j, mask=j_ok, other=0.0).to(tl.float32)
        z_lo = tl.load(z_ptr + g * stride_s + offs_j, mask=j_ok, other=0.0).to(tl.float32)
        z_hi = tl.load(z_ptr + g * stride_s + n_half + offs_j, mask=j_ok, other=0.0).to(tl.float32)
        acc_lo += dot_lo * s_lo[None, :] + x_sum[:, None] * z_lo[None, :]
        acc_hi += dot_hi * s_hi[None, :] + x_sum[:, None] * z_hi[None, :]
    out = y_ptr + offs_m[:, None] * stride_ym + offs_j[None, :]
    ok = m_ok[:, None] & j_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc_lo, mask=ok)
        tl.atomic_add(out + n_half, acc_hi, mask=ok)
    else:
        tl.store(out, acc_lo.to(y_ptr.dtype.element_ty), mask=ok)
        tl.store(out + n_half, acc_hi.to(y_ptr.dtype.element_ty), mask=ok)
