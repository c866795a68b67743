"""Shared fixtures: tiny random-init decoders (hidden 64, 2 layers) of the architectures we support.

Each builds in milliseconds and makes ``generate`` run well under a second on CPU. The real embedded
model (SmolLM2-135M-Instruct) is behind the ``smollm2`` fixture, converted once into the user's cache.
Plain helpers live in ``tests/helpers.py``: tests import them from there (``from helpers import ...``), never
from this file, so each helper module is loaded once.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import TINY_BUILDERS, make_tiny_model  # noqa: E402

@pytest.fixture(params=sorted(TINY_BUILDERS))
def tiny_model(request):
    """Each tiny architecture in turn (llama, qwen2 and the sliding/full hybrid gemma3)."""
    return make_tiny_model(request.param)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and a loaded 2-core CI box makes OpenMP spin for ms each."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (SmolLM2-135M-Instruct) and its tokenizer, fp32 on CPU."""
    from hf_adaptive.models import load_model

    return load_model(None, device="cpu", dtype="float32")


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    n_gpu = torch.cuda.device_count() if has_gpu else 0
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and n_gpu < 2:
            item.add_marker(pytest.mark.skip(reason="needs two or more CUDA GPUs"))
