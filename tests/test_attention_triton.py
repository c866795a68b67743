"""The fused Triton decode kernel against the torch reference, on fresh random packed layers.

GPU tests are marked ``gpu``. ``test_kernel_under_triton_interpreter`` runs a few of the same cases on
CPU through Triton's interpreter (``TRITON_INTERPRET=1`` must be set before triton compiles anything, so
it runs this file as a script in a subprocess); it skips only when triton is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import asdict, dataclass, field

import pytest
import torch
from helpers import run_under_triton_interpreter

from hf_adaptive.kv.build import pack_dense_kv
from hf_adaptive.attention.reference import reference_decode_attention

REL_TOL = 1e-2  # bf16 inputs, float32 accumulation


@dataclass(frozen=True)
class Case:
    head_dim: int = 64
    group: int = 4  # query heads per kv head
    batch: int = 1
    kv_heads: int = 2
    block_bits: tuple[int, ...] = (16, 8, 4, 8)
    tail: int = 37  # exact tokens after the history blocks (not a multiple of the block size)
    block_size: int = 64
    value_group: int = 32
    dtype: str = "bfloat16"
    softcap: float | None = None
    window: int | None = None
    pad: tuple[int, ...] = field(default_factory=tuple)  # left padding per sequence -> key mask
    seed: int = 0
    chunk: int | None = None  # DecodeKernelConfig.chunk
    max_registers: int | None = None  # DecodeKernelConfig.max_registers
    static: bool = False  # read through a static view: capacity-sized tensors with garbage past the device lengths
    book: bool = False  # static views only: the history storage reachable only through the view's address book


def run_case(case: Case, device: str) -> dict:
    """Kernel vs reference on one case; returns the errors and the shapes (printed on failure)."""
    from hf_adaptive.attention.triton_decode import DecodeKernelConfig, triton_decode_attention

    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(case.seed)
    n = len(case.block_bits) * case.block_size + case.tail
    shape = (case.batch, case.kv_heads, n, case.head_dim)
    k = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype).to(device)  # off-center keys, like real ones
    v = torch.randn(shape, generator=g).to(dtype).to(device)
    q = torch.randn(case.batch, case.kv_heads * case.group, 1, case.head_dim, generator=g).to(dtype).to(device)
    packed = pack_dense_kv(k, v, list(case.block_bits), block_size=case.block_size, value_group=case.value_group,
                           spare_slots=2, seed=case.seed)
    key_mask = None
    if case.pad:
        key_mask = torch.ones(case.batch, n, dtype=torch.bool, device=device)
        for b, p in enumerate(case.pad):
            key_mask[b, :p] = False
    kw = dict(scaling=case.head_dim**-0.5, softcap=case.softcap, sliding_window=case.window, key_mask=key_mask)
    out = torch.full_like(q, float("nan"))  # poison: any row the kernel fails to write stays NaN
    view = _as_static(packed, key_mask, kw, case.book) if case.static else packed
    got = triton_decode_attention(q, view, out=out, config=DecodeKernelConfig(chunk=case.chunk, max_registers=case.max_registers), **kw)
    kw["key_mask"] = key_mask
    want = reference_decode_attention(q, packed, **kw)
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    return {"case": asdict(case), "max_abs_err": err, "ref_max": scale, "rel_err": err / max(scale, 1e-6),
            "finite": bool(torch.isfinite(got).all()), "q": tuple(q.shape), "n_tokens": n,
            "pools": {b: tuple(p.k_codes.shape) for b, p in packed.pools.items()}, "full_k": tuple(packed.full_k.shape)}


def _as_static(packed, key_mask, kw: dict, book: bool = False):
    """The same layer as a static view: 3 spare block-table entries and 21 spare tail rows of garbage that the
    device lengths must keep the kernel from reading; the key mask widened to the view's max_tokens. With
    ``book``, the view holds no history tensor: only its address book leads to the pools."""
    from dataclasses import replace

    from hf_adaptive.kv.packed import PoolBook, book_entries, book_table

    n_blocks, n_tail = packed.block_bits.numel(), packed.tail_k.shape[-2]
    dev = packed.tail_k.device
    spare = torch.full((3,), 16, dtype=torch.int32, device=dev)
    B, H, _, D = packed.tail_k.shape
    junk = torch.full((B, H, 21, D), 1e4, dtype=packed.tail_k.dtype, device=dev)
    lengths = torch.tensor([n_blocks, n_tail], dtype=torch.int32, device=dev)
    max_tokens = packed.num_tokens + 40
    if key_mask is not None:
        wide = torch.zeros(key_mask.shape[0], max_tokens, dtype=torch.bool, device=dev)
        wide[:, : key_mask.shape[1]] = key_mask
        kw["key_mask"] = wide
    view = replace(packed, block_bits=torch.cat([packed.block_bits, spare]),
                   block_slot=torch.cat([packed.block_slot, torch.zeros_like(spare)]),
                   tail_k=torch.cat([packed.tail_k, junk], -2), tail_v=torch.cat([packed.tail_v, junk], -2),
                   lengths=lengths, max_tokens=max_tokens)
    if not book:
        return view
    header = torch.tensor(book_entries(packed.full_k, packed.full_v, packed.pools), dtype=torch.int64, device=dev)
    rows, starts = book_table(packed.block_bits.tolist(), packed.block_slot.tolist())
    spare_rows = [spare.tolist(), [0] * 3, [0] * 3, [0] * 3]  # past the live table: never read
    table = torch.tensor([r + sr for r, sr in zip(rows, spare_rows)], dtype=torch.int64, device=dev).view(-1)
    entries = torch.cat([header, table, torch.tensor(starts, dtype=torch.int64, device=dev)])
    empty, no_table = packed.tail_k.new_empty(0), header.new_empty(0)
    return replace(view, full_k=empty, full_v=empty, pools={}, block_bits=no_table, block_slot=no_table,
                   book=PoolBook(entries, tuple(sorted(packed.pools)), view.block_bits.numel()))


def _assert_ok(res: dict) -> None:
    assert res["finite"] and res["rel_err"] <= REL_TOL, json.dumps(res, indent=1)


GPU_CASES = [
    Case(head_dim=d, group=gq, batch=b, block_bits=bits, tail=t, seed=i)
    for i, (d, gq, b, bits, t) in enumerate([
        (64, 1, 1, (16, 8, 4), 37), (64, 4, 3, (8, 4, 16, 4, 8), 1), (64, 8, 1, (4,) * 20, 63),
        (128, 1, 3, (4, 8, 2, 16), 10), (128, 4, 1, (8,) * 9, 0), (128, 8, 3, (16, 4), 50),
        (256, 1, 1, (8, 4), 5), (256, 4, 3, (4, 16, 8, 2), 33), (256, 8, 1, (2, 4, 8, 16), 64),
    ])
] + [
    Case(dtype="float16", tail=20), Case(dtype="float32", head_dim=128, tail=3),
    Case(block_bits=(), tail=45), Case(block_bits=(8, 4), tail=0),  # tail only; no tail
    Case(block_size=32, block_bits=(4, 8, 16, 4, 2), tail=31), Case(block_size=128, head_dim=128, tail=100),
    Case(softcap=5.0), Case(window=100, block_bits=(8, 4, 4, 16, 8), tail=9),
    Case(batch=3, pad=(0, 5, 70)), Case(value_group=64, head_dim=128), Case(value_group=16),
    Case(value_group=64, batch=8, kv_heads=8, block_bits=(4,) * 63, tail=64),  # the benchmark shape, 4k tokens
    Case(block_bits=(4,) * 512, tail=17, batch=2),  # 32k tokens: many splits
] + [  # every code width and head dim, with chunks smaller than a block
    Case(head_dim=d, block_bits=(2, 4, 8, 16, 4), tail=9, chunk=32, seed=d) for d in (64, 128, 256)
] + [  # one precision throughout, as a fixed_bits cache holds it
    Case(block_bits=(4,) * 40, tail=17, batch=2, value_group=64),
    Case(block_bits=(8,) * 9, tail=0, head_dim=128, value_group=64),
    Case(block_bits=(4,) * 7, tail=5, window=200, pad=(3,), value_group=16),
] + [  # static views (device lengths): the compiled cache's read path
    Case(static=True, block_bits=(4,) * 63, tail=65, value_group=64, batch=8, kv_heads=8),
    Case(static=True, block_bits=(16, 8, 4), tail=0), Case(static=True, batch=3, pad=(0, 5, 70)),
    Case(static=True, book=True, block_bits=(4,) * 63, tail=65, value_group=64, batch=8, kv_heads=8),
    Case(static=True, book=True, head_dim=128, block_bits=(2, 4, 8, 16), tail=9, batch=3, pad=(0, 5, 70)),
] + [  # a register cap (spills) must not change results
    Case(static=True, book=True, block_bits=(16, 8, 4, 4), tail=9, batch=2, max_registers=r) for r in (128, 96)
] + [Case(block_bits=(8, 4, 2, 16), tail=9, chunk=32, max_registers=64)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"d{c.head_dim}-g{c.group}-b{c.batch}-{c.dtype}-"
                         f"n{len(c.block_bits)}x{c.block_size}+{c.tail}-cap{c.softcap}-w{c.window}-pad{len(c.pad)}")
def test_kernel_matches_reference_on_gpu(case):
    """Guards against wrong block-table addressing, bit unpacking, scale/zero indexing, GQA grouping, split
    merging, tail masking and key masks in the fused kernel: it must match the reference within bf16 error."""
    _assert_ok(run_case(case, "cuda"))


if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from hf_adaptive.attention import _triton_kernels

    @triton.jit
    def _decode_bytes(src, scale, zero, codes, values, H: tl.constexpr, BITS: tl.constexpr):
        offs = tl.arange(0, 64)[:, None] * 32 + tl.arange(0, 32)[None, :]
        raw = tl.load(src + offs)
        tl.store(codes + offs, _triton_kernels._f16_codes(raw, H, BITS))
        tl.store(values + offs, _triton_kernels._f16_values(raw, tl.load(scale + offs), tl.load(zero + offs), H, BITS))


@pytest.mark.gpu
@pytest.mark.parametrize("bits,half", [(4, 0), (4, 1), (8, 0)])
def test_code_bytes_decode_exactly_on_gpu(bits, half):
    """Guards the PTX decode of packed code bytes (lane order, nibble choice, the exponent trick, the packed fma):
    every byte value, at every position of a (64, 32) tile, must decode to its code exactly (4 bits: the low nibble
    for half 0, the high one for half 1; 8 bits: the byte), and code x scale + zero must be the float16 of the exact
    value (one rounding)."""
    g = torch.Generator(device="cuda").manual_seed(bits + half)
    src = (torch.arange(64 * 32, device="cuda") * 7 % 256).to(torch.uint8).reshape(64, 32)
    scale = (torch.rand(64, 32, device="cuda", generator=g) * 0.1).half()
    zero = (torch.randn(64, 32, device="cuda", generator=g)).half()
    codes, values = (torch.empty(64, 32, dtype=torch.float16, device="cuda") for _ in range(2))
    _decode_bytes[(1,)](src, scale, zero, codes, values, half, bits)
    want = src.int() if bits == 8 else (src.int() >> (4 * half)) & 15
    assert torch.equal(codes.float(), want.float())
    assert torch.equal(values, (want.double() * scale.double() + zero.double()).half())


@pytest.mark.gpu
def test_kernel_is_cuda_graph_capturable():
    """Guards against host syncs or per-call host state in the kernel wrapper: a captured graph replayed
    after the packed data changed in place must give the new result."""
    from hf_adaptive.attention.triton_decode import triton_decode_attention

    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 8, 64 * 6 + 11, 64, generator=g).bfloat16().cuda()
    packed = pack_dense_kv(k, k.clone(), [4, 8, 16, 4, 8, 4], block_size=64, value_group=32)
    q = torch.randn(2, 32, 1, 64, generator=g).bfloat16().cuda()
    out = torch.empty_like(q)
    triton_decode_attention(q, packed, scaling=0.125, out=out)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_decode_attention(q, packed, scaling=0.125, out=out)
    q.copy_(torch.randn(q.shape, generator=g).bfloat16().cuda())
    packed.tail_v.mul_(-1.0)
    graph.replay()
    want = reference_decode_attention(q, packed, scaling=0.125)
    err = (out.float() - want.float()).abs().max().item()
    assert err <= REL_TOL * want.float().abs().max().item(), err


INTERPRETER_CASES = [
    Case(head_dim=16, group=4, block_size=16, block_bits=(16, 8, 4, 2, 8), tail=7, value_group=8, dtype="float32"),
    Case(head_dim=32, group=1, batch=2, block_size=16, block_bits=(4, 4, 16), tail=0, value_group=32,
         dtype="float16", pad=(0, 9)),  # value_group == D: one value group per token
    Case(head_dim=64, group=8, block_size=32, block_bits=(8, 2), tail=31, dtype="bfloat16", softcap=3.0),
    Case(head_dim=64, group=4, block_size=16, block_bits=(4, 8, 4), tail=4, value_group=64, dtype="float32"),
    Case(head_dim=128, group=2, block_size=16, block_bits=(4, 16, 8), tail=2, value_group=64, dtype="float32"),
    Case(head_dim=16, group=2, block_size=16, block_bits=(4, 8, 8, 16, 4), tail=5, value_group=8, window=40,
         dtype="float32"),
    Case(head_dim=32, group=4, block_size=32, block_bits=(2, 4, 16, 8), tail=3, value_group=16, dtype="float16",
         chunk=16, max_registers=128),  # two chunks per block
    Case(head_dim=16, group=2, batch=2, block_size=16, block_bits=(4, 16, 8), tail=9, value_group=8,
         dtype="float32", pad=(0, 6), static=True),
    Case(head_dim=16, group=2, block_size=16, block_bits=(16, 8, 4), tail=0, value_group=8, dtype="float32",
         static=True),  # empty tail
    Case(head_dim=16, group=2, batch=2, block_size=16, block_bits=(4,) * 6, tail=3, value_group=8,
         dtype="float32", pad=(0, 6)),
    Case(head_dim=64, group=4, block_size=16, block_bits=(8,) * 5, tail=0, value_group=64, dtype="float32",
         static=True),
    Case(head_dim=32, group=2, block_size=16, block_bits=(2,) * 3, tail=9, value_group=16, dtype="float32",
         window=30),
    Case(head_dim=16, group=2, batch=2, block_size=16, block_bits=(4, 16, 2, 8), tail=9, value_group=8,
         dtype="float32", pad=(0, 6), static=True, book=True),
    Case(head_dim=32, group=4, block_size=16, block_bits=(8, 4), tail=0, value_group=16, dtype="float16",
         static=True, book=True),  # no 16-bit block: the book's 16-bit entries point at an empty pool
    Case(head_dim=32, group=4, block_size=32, block_bits=(2, 4, 16, 8, 4, 16, 2), tail=3, value_group=16,
         dtype="float16", chunk=16, pad=(21,), static=True, book=True),  # two chunks per block, groups out of order
    Case(head_dim=64, group=4, batch=2, block_size=16, block_bits=(4,) * 9, tail=11, value_group=64,
         dtype="float32", static=True, book=True),  # one precision: splits cut through the 4-bit group
    Case(head_dim=32, group=4, batch=2, block_size=32, block_bits=(4, 16, 4, 8, 4, 16, 4, 4), tail=5, value_group=16,
         dtype="float16", chunk=16, pad=(0, 150), static=True, book=True),  # padding ends mid-chunk, deep in a
    # precision group: each chunk's mask bytes are prefetched a chunk ahead, through the block's logical index
]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_kernel_under_triton_interpreter():
    """Guards the kernel's logic (addressing, unpacking, masking, split merge) on machines without a GPU:
    the same kernel source, run by Triton's CPU interpreter, must match the reference."""
    results = run_under_triton_interpreter(__file__)
    assert len(results) == len(INTERPRETER_CASES)
    for res in results:
        _assert_ok(res)


if __name__ == "__main__":  # the interpreter run of test_kernel_under_triton_interpreter
    print(json.dumps([run_case(c, "cpu") for c in INTERPRETER_CASES]))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("head_dim,value_group,device_lens,dtype", [
    (128, 64, False, "bf16"), (64, 32, False, "bf16"), (64, 64, True, "bf16"), (16, 8, False, "bf16"),
    (128, 64, "book", "bf16"), (64, 64, "book", "fp32")])
def test_kernel_compiles_for_hopper(head_dim, value_group, device_lens, dtype):
    """Guards against compile-only failures the interpreter cannot see (branch type mismatches, constexpr
    misuse, layout errors): the kernel with every feature on must compile to an sm_90 cubin without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_adaptive.attention import triton_decode

    fn = triton_decode.kernels.decode_split_kernel
    const = dict(GROUP=4, GP=16, D=head_dim, HD=max(16, head_dim // 2), G=value_group, BS=64, CHUNK=64, HAS8=True,
                 HAS4=True, HAS2=True, HAS_MASK=True, WINDOW=0 if device_lens else 128, SOFTCAP=True,
                 F32_DOTS=False, DEVICE_LENS=bool(device_lens), BOOK=device_lens == "book")
    sig = triton_decode.kernel_signature(const, dtype)
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 8})
    assert "cubin" in kernel.asm and len(kernel.asm["cubin"]) > 0


def _book_build(has_mask: bool, num_warps: int, head_dim: int = 64, dtype: str = "bf16",
                num_stages: int | None = None):
    """The sm_90 build of the static caches' path (address book, device lengths, 16/8/4 bits) at the launch's chunk
    for ``head_dim`` and, unless given, the default pipelining depth; no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_adaptive.attention import triton_decode

    const = dict(GROUP=4, GP=16, D=head_dim, HD=head_dim // 2, G=64, BS=64, CHUNK=32 if head_dim >= 256 else 64,
                 HAS8=True, HAS4=True, HAS2=False, HAS_MASK=has_mask, WINDOW=0, SOFTCAP=False, F32_DOTS=False,
                 DEVICE_LENS=True, BOOK=True)
    stages = num_stages or triton_decode.DecodeKernelConfig().num_stages
    return triton.compile(ASTSource(fn=triton_decode.kernels.decode_split_kernel,
                                    signature=triton_decode.kernel_signature(const, dtype), constexprs=const),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": stages})


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_book_walk_prefetches_the_key_mask():
    """Guards the speed of the caches' path inside ``model.generate``, which always passes a key mask: Triton's
    pipeliner does not copy the mask ahead (it feeds no dot), so each history walk loads a chunk's mask bytes one chunk
    early and carries them into the next iteration. A mask load whose bytes are compared in the iteration that loads
    them waits a memory round trip per chunk; only the exact tail's loop (one or two chunks) may do that."""
    lines = _book_build(has_mask=True, num_warps=2).asm["ttgir"].splitlines()
    carried, compared = 0, 0
    for i, line in enumerate(lines):
        load = re.search(r"(%[\w.]+) = tt\.load .*tensor<64x!tt\.ptr<i8>,", line)
        if load is None:
            continue
        used = re.compile(re.escape(load.group(1)) + r"\b")
        for later in lines[i + 1:]:  # up to the loop that takes the bytes in, or the end of the loop that loads them
            if "scf.yield" in later or "scf.for" in later:
                carried += 1
                break
            if used.search(later):
                compared += 1
                break
    assert carried >= 3, f"the 16-, 8- and 4-bit walks should carry prefetched mask bytes; {carried} do"
    assert compared <= 1, f"{compared} mask loads are compared in the iteration that loads them (the tail's may)"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_book_walk_pipelines_its_loads():
    """Guards the caches' decode speed against a change Triton's pipeliner silently declines: on the book path (the
    static caches' build for sm_90) each precision's loop must copy its code tiles ahead with cp.async and load them
    as 16-byte vectors. A branch per chunk or an address without known alignment (what the kernel had before) builds
    fine but reads one chunk at a time, element by element."""
    kernel = _book_build(has_mask=False, num_warps=4)
    ir = kernel.asm["ttgir"]
    copies = re.findall(r"async_copy_global_to_local .*tensor<64x(\d+)x!tt.ptr<(\w+)>", ir)
    assert ("32", "i8") in copies, "4/8-bit code bytes (64 rows x 32 bytes) are not copied ahead"  # D=64 4-bit
    assert ("32", "bf16") in copies, "16-bit history halves are not copied ahead"
    assert re.search(r"cp\.async\.c[ag]\.shared\.global \[[^]]+\], \[[^]]+\], (0x10|16)\b", kernel.asm["ptx"]), \
        "no 16-byte cp.async: the book's addresses lost their alignment"


def test_kernel_input_checks_name_the_problem():
    """Guards against the fused kernel silently reading garbage: prefill-shaped queries, unsupported head
    dims, block sizes and dtype mismatches must be refused with the offending value in the message
    (checked on CPU, before any launch)."""
    from hf_adaptive.attention.triton_decode import DecodeKernelConfig, _check_inputs

    k = torch.randn(1, 2, 3 * 16 + 5, 64, dtype=torch.bfloat16)
    packed = pack_dense_kv(k, k.clone(), [8, 4, 16], block_size=16, value_group=32)
    q = torch.randn(1, 8, 1, 64, dtype=torch.bfloat16)
    _check_inputs(q, packed, None, None)
    with pytest.raises(ValueError, match="q_len must be 1, got 3"):
        _check_inputs(torch.randn(1, 8, 3, 64, dtype=torch.bfloat16), packed, None, None)
    with pytest.raises(ValueError, match="query .* does not match"):
        _check_inputs(torch.randn(1, 8, 1, 48, dtype=torch.bfloat16), packed, None, None)
    with pytest.raises(ValueError, match="packed.tail_k is torch.bfloat16"):
        _check_inputs(q.half(), packed, None, None)
    with pytest.raises(ValueError, match="out must be"):
        _check_inputs(q, packed, None, torch.empty(1, 8, 1, 64))
    odd = pack_dense_kv(k, k.clone(), [8, 4], block_size=24, value_group=32)
    with pytest.raises(ValueError, match="block_size=24"):
        _check_inputs(q, odd, None, None)
    with pytest.raises(ValueError, match="chunk=48"):
        DecodeKernelConfig(chunk=48)
    with pytest.raises(ValueError, match="num_stages=0"):
        DecodeKernelConfig(num_stages=0)
    with pytest.raises(ValueError, match="max_registers=300"):
        DecodeKernelConfig(max_registers=300)


HOPPER_SHARED_BYTES = 232448  # the most shared memory one block may use on an sm_90 SM (227 KiB)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("head_dim,dtype", [(64, "bf16"), (128, "bf16"), (256, "bf16"), (64, "fp32"), (128, "fp32"),
                                            (256, "fp32")])
def test_static_path_fits_hopper_shared_memory(head_dim, dtype):
    """Guards against a launch that cannot start on an H100/H200 (``OutOfResources`` inside ``model.generate``): the
    static caches' build (address book, key mask, 16/8/4 bits) at the launch's own chunk, warps and pipelining depth
    must fit an sm_90 block's shared memory, float32 models (twice the tile bytes) included."""
    from hf_adaptive.attention import triton_decode

    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    warps = 8 if head_dim >= 128 else 4 if dtype == "fp32" else 2  # the launch's defaults (_plan_launch)
    chunk = 32 if head_dim >= 256 else 64  # the launch's default chunk, as _book_build builds it
    kernel = _book_build(True, warps, head_dim, dtype,
                         triton_decode.launch_stages(triton_decode.DecodeKernelConfig(), torch_dtype, chunk, head_dim))
    assert kernel.metadata.shared <= HOPPER_SHARED_BYTES, (head_dim, dtype, kernel.metadata.shared)
