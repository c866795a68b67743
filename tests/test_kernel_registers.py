"""The ahead-of-time register report of the decode kernel (sm_90 builds on a CPU host, no GPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers import load_eval_script


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_register_report_builds_the_caches_kernel_and_counts_programs(tmp_path):
    """Guards against a report that stops reading the cubin (a Triton or cuobjdump change) or miscounts occupancy:
    the adaptive caches' build must report registers in 1..255 and programs per SM = 65536 // (regs x 128)."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton ships no cuobjdump")
    script = load_eval_script("kernel_registers")
    assert script.main(["--chunks", "64", "--warps", "4", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "registers.json").read_text())["rows"]
    assert {r["config"] for r in rows} == set(script.CONFIGS)
    for r in rows:
        assert 1 <= r["registers"] <= 255
        assert r["programs_per_sm_by_registers"] == 65536 // (r["registers"] * 32 * 4)
    # the adaptive build walks 16-, 8- and 4-bit history and the tail in four loops; every loop folds a chunk
    adaptive = next(r for r in rows if r["config"] == "adaptive")
    assert len(adaptive["loop_instructions"]) == 4 and min(adaptive["loop_instructions"]) >= 64


def test_loop_instructions_reads_backward_branches():
    """Guards the SASS loop count against miscounting: a backward branch closes a loop of the instructions since its
    label, a forward branch closes none, and short loops are left out."""
    script = load_eval_script("kernel_registers")
    body = "\n".join(f"        /*{0x100 + 16 * i:04x}*/                   FADD R1, R1, R2 ;" for i in range(70))
    sass = (".L_x_0:\n" + body + "\n        /*1000*/                   BRA `(.L_x_1) ;\n"
            "        /*1010*/              @P0 BRA `(.L_x_0) ;\n.L_x_1:\n        /*1020*/     EXIT ;\n"
            ".L_x_2:\n        /*1030*/     IADD3 R1, R1, 1, RZ ;\n        /*1040*/  @P1 BRA `(.L_x_2) ;\n")
    assert script.loop_instructions(sass) == [72]
