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
