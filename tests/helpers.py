"""Plain helpers of the tests (no fixtures): tiny random-init decoders of every supported architecture, the
two precision decode paths run side by side, and a Triton-interpreter runner.

Imported as ``from helpers import ...`` (pytest puts tests/ on ``sys.path``; a test file run as a script has it
as its own folder); fixtures stay in conftest.py.
"""

from __future__ import annotations

import torch

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


def decode_both_paths(tiers, ids, policy, max_len: int, new_tokens: int, lag: int) -> list[tuple]:
    """Greedy decode with a live PrecisionController on the eager graph path (``decode``) and on the fused
    in-graph-decision path (``FusedStepDecoder``): [(tokens, tiers run, scores recorded)] for each, in that order."""
    from hf_adaptive.precision.controller import PrecisionController
    from hf_adaptive.precision.decode import decode
    from hf_adaptive.precision.fused_decode import FusedStepDecoder, decision_for
    from hf_adaptive.precision.graph_decode import GraphDecodeConfig, GraphDecodeEngine
    from hf_adaptive.precision.options import DecodeOptions

    runs = []
    for fused in (False, True):
        ctl = PrecisionController(tiers, policy)
        opts = DecodeOptions(max_new_tokens=new_tokens, controller=ctl, decision_lag=lag)
        engine = GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=ids.shape[0], max_len=max_len))
        if fused:
            dec = FusedStepDecoder(engine, decision_for(ctl), capacity=new_tokens)
            out = dec.generate(ids, opts)
            assert dec.graphs or ids.device.type != "cuda", "fused path did not capture graphs on CUDA"
        else:
            out = decode(engine, ids, opts)
        ctl.close()
        runs.append((out, ctl.telemetry.tiers, ctl.telemetry.scores))
    return runs


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


def load_eval_script(name: str):
    """``eval/<name>.py`` as a module, importable the way Python runs it: with eval/ on ``sys.path`` (appended, so
    it shadows nothing), where its ``_common`` import resolves. The module is registered under ``eval_<name>``."""
    import importlib.util
    import sys
    from pathlib import Path

    eval_dir = Path(__file__).resolve().parents[1] / "eval"
    if str(eval_dir) not in sys.path:
        sys.path.append(str(eval_dir))
    spec = importlib.util.spec_from_file_location(f"eval_{name}", eval_dir / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
