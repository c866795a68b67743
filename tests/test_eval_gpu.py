"""Speed measurement on CUDA (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from hf_adaptive.evaluation.settings import build_setting
from hf_adaptive.evaluation.timing import SpeedConfig, measure_speed
from helpers import make_tiny_model


@pytest.mark.gpu
def test_measure_speed_on_cuda_reports_cuda_peak_memory():
    """Guards against CPU-only timing code on GPU: stamps must be synchronized and peak memory read from CUDA."""
    model = make_tiny_model("llama", dtype=torch.bfloat16).to("cuda")
    ids = torch.randint(1, 128, (2, 32), device="cuda")
    config = SpeedConfig(batch_size=2, prompt_tokens=32, new_tokens=16, warmup=1, repeats=2)
    for spec in ("baseline", "kv:bits=4,residual_length=8,block_size=8"):
        result = measure_speed(model, ids, build_setting(spec, model), config)
        assert result["decode_tokens_per_s"] > 0 and result["p99_token_ms"] >= result["p50_token_ms"]
        assert 0 < result["peak_memory_bytes"] < torch.cuda.get_device_properties(0).total_memory
