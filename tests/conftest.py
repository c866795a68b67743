"""Shared fixtures: tiny random-init decoders (hidden 64, 2 layers) of the architectures we support.

Each builds in milliseconds and makes ``generate`` run well under a second on CPU. The real embedded
model (SmolLM2-135M-Instruct) is behind the ``smollm2`` fixture, converted once into the user's cache.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 128


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return Qwen2ForCausalLM(cfg)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                        sliding_window=None)
    return MistralForCausalLM(cfg)


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # sliding_window smaller than the test prompts so the sliding layer really slides
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512)
    return Gemma3ForCausalLM(cfg)


TINY_BUILDERS = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral, "gemma3": _gemma3}


def make_tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random-init decoder in eval mode; ``arch`` is one of ``TINY_BUILDERS``."""
    torch.manual_seed(seed)
    model = TINY_BUILDERS[arch]().to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


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


def decode_both_paths(tiers, ids, policy, max_len: int, new_tokens: int, lag: int) -> list[tuple]:
    """Greedy decode with a live PrecisionController on the eager graph path (``decode``) and on the fused
    in-graph-decision path (``FusedStepDecoder``): [(tokens, tiers run, scores recorded)] for each, in that order."""
    from hf_adaptive.precision.controller import PrecisionController
    from hf_adaptive.precision.decode import DecodeOptions, decode
    from hf_adaptive.precision.fused_decode import FusedOptions, FusedStepDecoder, decision_for
    from hf_adaptive.precision.graph_decode import GraphDecodeConfig, GraphDecodeEngine

    runs = []
    for fused in (False, True):
        ctl = PrecisionController(tiers, policy)
        engine = GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=ids.shape[0], max_len=max_len))
        if fused:
            dec = FusedStepDecoder(engine, decision_for(ctl), capacity=new_tokens)
            out = dec.generate(ids, FusedOptions(max_new_tokens=new_tokens, controller=ctl, decision_lag=lag))
            assert dec.graphs or ids.device.type != "cuda", "fused path did not capture graphs on CUDA"
        else:
            out = decode(engine, ids, DecodeOptions(max_new_tokens=new_tokens, controller=ctl, decision_lag=lag))
        ctl.close()
        runs.append((out, ctl.telemetry.tiers, ctl.telemetry.scores))
    return runs


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


def run_under_triton_interpreter(test_file: str) -> list:
    """Run ``test_file`` as a script with ``TRITON_INTERPRET=1`` (it must be set before triton compiles anything,
    hence a fresh process) and return the JSON list its ``__main__`` prints last; fails with the output on error."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(test_file)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, test_file], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
