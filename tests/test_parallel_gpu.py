"""Multi-GPU checks (skipped without >= 2 CUDA GPUs): every plan vs one GPU on SmolLM2's real weights.

Runs ``eval/parallel_equivalence.py`` through the package's launcher on all visible GPUs (NCCL) and asserts its verdicts.
Set ``HF_ADAPTIVE_TEST_MODEL`` to a local checkpoint dir (default: the embedded SmolLM2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
@pytest.mark.multigpu
def test_plans_match_one_gpu_fp32_tokens_and_bf16_logits(tmp_path):
    """Guards NCCL-path sharding bugs (TP all-reduce, PP send/recv on device, group layout on 2/4 GPUs):
    fp32 greedy tokens must equal one GPU's for every plan; bf16 logits must stay within tolerance of one
    GPU's bf16, or no further from fp32 than one GPU's bf16 is (mean and top-1)."""
    n = torch.cuda.device_count()
    model = os.environ.get("HF_ADAPTIVE_TEST_MODEL", "smollm2-135m-instruct")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "hf_adaptive.parallel.run_script", "--processes", str(n),
           str(REPO / "eval/parallel_equivalence.py"), "--model", model, "--out", str(tmp_path), "--new-tokens", "32"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert (tmp_path / "equivalence.json").exists(), proc.stderr[-4000:]
    report = json.loads((tmp_path / "equivalence.json").read_text())
    assert report["fp32_tokens_identical_all_plans"], report["results"]
    assert report["bf16_ok"] and all(report["bf16_ok"].values()), report["results"]
