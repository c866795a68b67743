"""PTX that turns packed integer codes into 16-bit float lanes, shared by the Triton kernels that read codes (the
packed-KV decode attention, the int4 weight matmul). Pure strings: no triton import.

Contract: ``code_lanes_asm(shift, mask, lane, tail)`` is the body of a ``tl.inline_asm_elementwise`` with
``pack=4``: four code bytes in ``$2`` become the codes of their field at bit ``shift`` (width given by ``mask``) in
four 16-bit float lanes of two registers, bytes 0, 1 in ``t`` and 2, 3 in ``u``. Two bytes are spread over the two
16-bit lanes of a register (``prmt``), one ``lop3`` keeps the code field and writes the exponent of the lane type's
``MAGIC`` over it, so each lane is that power of two plus the code exactly; ``tail`` (PTX over ``t``, ``u`` and
the operands from ``$3`` on) then takes the power off and writes ``$0``, ``$1``. About 1.5 instructions per code.
"""

from __future__ import annotations

# per 16-bit float type: the power of two whose ulp is 1 over the code range, as two lanes
MAGIC = {"f16": 0x64006400, "bf16": 0x43004300}  # 1024.0 (codes < 1024), 128.0 (codes < 128)


def code_lanes_asm(shift: int, mask: int, lane: str, tail: str, regs: str = "", setup: str = "") -> str:
    """The PTX body described in the module docstring; ``regs`` / ``setup`` declare and fill extra registers
    ``tail`` uses."""
    spread = "prmt.b32 t, $2, 0, 0x4140;\nprmt.b32 u, $2, 0, 0x4342;\n"  # bytes 0, 1 / 2, 3 to the 16-bit lanes
    if shift:
        spread += f"shr.u32 t, t, {shift};\nshr.u32 u, u, {shift};\n"
    if lane not in MAGIC:
        raise ValueError(f"code_lanes_asm: lane must be one of {sorted(MAGIC)}, got {lane!r}")
    field, magic = mask | mask << 16, MAGIC[lane]
    code = (f"lop3.b32 t, t, {field:#010x}, {magic:#010x}, 0xea;\n"
            f"lop3.b32 u, u, {field:#010x}, {magic:#010x}, 0xea;\n")
    return "{.reg .b32 t, u" + regs + ";\n" + setup + spread + code + tail + "}"
