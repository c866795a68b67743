"""The shared PTX code-lane builder: what the decode attention and the int4 matmul decode codes with."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest

from hf_adaptive.ptx_codes import code_lanes_asm

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_attention_ptx_is_the_one_verified_on_a_gpu():
    """Guards the decode attention's code decode: built through the shared builder, its six PTX bodies are byte for
    byte those that passed the GPU exactness test (every 4- and 8-bit code decoded exactly), by sha256 prefix."""
    from hf_adaptive.attention import _triton_kernels as kernels

    verified = {"F16_CODES_4LO": "14050c99b5555b43", "F16_CODES_4HI": "426655901c0cf186",
                "F16_CODES_8": "6ed84bdc74b7b10e", "F16_VALUES_4LO": "d9acc907da66a612",
                "F16_VALUES_4HI": "51dea2f9e0b57103", "F16_VALUES_8": "9488538b1fca9a4f"}
    for name, digest in verified.items():
        body = getattr(kernels, name)
        body = getattr(body, "value", body)
        assert hashlib.sha256(body.encode()).hexdigest()[:16] == digest, name


def test_code_lanes_write_the_lane_types_power_of_two_over_the_field():
    """Guards the builder's choices: the field mask in both 16-bit lanes, the magic of the lane type, the nibble
    shift only where asked, and the tail last inside one block."""
    body = code_lanes_asm(4, 0xF, "bf16", "mov.b32 $0, t;\nmov.b32 $1, u;")
    assert "0x000f000f, 0x43004300" in body and "shr.u32 t, t, 4;" in body
    assert body.startswith("{.reg .b32 t, u;") and body.endswith("mov.b32 $1, u;}")
    bytes8 = code_lanes_asm(0, 0xFF, "f16", "")
    assert "shr" not in bytes8 and "0x00ff00ff, 0x64006400" in bytes8
    with pytest.raises(ValueError, match="lane must be one of"):
        code_lanes_asm(0, 0xF, "f32", "")
