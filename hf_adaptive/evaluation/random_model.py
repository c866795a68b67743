"""Random-weight models of a real architecture, built from config.json alone (no weights read).

Contract: ``load_random_model(spec, device, dtype, seed)`` resolves ``spec`` (embedded model name or a
directory holding ``config.json`` + tokenizer files, weights optional and never opened), builds the
architecture with ``AutoModelForCausalLM.from_config`` directly on ``device`` in ``dtype`` (parameters
are allocated and initialised there, so a 1.5B model on a GPU takes seconds, not a CPU round trip) with
a seeded normal init, and returns ``(model, tokenizer)``. Used by speed runs on machines the real
weights cannot travel to: decode speed depends on shapes and dtypes, not on weight values.

``export_model_config(spec, out_dir)`` writes such a config-only directory (config, generation config,
tokenizer files) for ``scripts/export_model_config.py``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Files a config-only directory carries; weights (*.safetensors, *.bin, *.gguf, indexes) never.
CONFIG_FILES = ("config.json", "generation_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
_DTYPES = ("auto", "bfloat16", "float16", "float32")


def resolve_dtype(device: str, dtype: str) -> Any:
    """``"auto"`` -> bf16 on CUDA, fp32 elsewhere (as :func:`hf_adaptive.models.load_model`); else by name."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported for random weights; allowed: {list(_DTYPES)}. "
                         "Fix: e.g. --dtype bfloat16.")
    return getattr(torch, dtype)


def load_random_model(spec: str | Path | None, device: str | None = None, dtype: str = "auto",
                      seed: int = 0) -> tuple[Any, Any]:
    """``(model, tokenizer)``: ``spec``'s architecture with seeded random weights, built on ``device``.

    Args:
        spec: embedded model name, or a directory with ``config.json`` and tokenizer files (weights
            may be absent; they are not read).
        device: ``"cuda"``, ``"cpu"``...; default CUDA when available.
        dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        seed: the init seed (same seed, same device -> same weights).

    Returns:
        An eval-mode model whose parameters all live on ``device`` in ``dtype``, and its tokenizer.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hf_adaptive.models import resolve_model_dir

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(device, dtype)
    path = resolve_model_dir(spec)
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    # Allocate on the target device: from_config's own init (normal, std=initializer_range) runs there.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    logger.info("random weights: %s (%s) on %s, seed %d", config.model_type, torch_dtype, device, seed)
    return model, tokenizer


def export_model_config(spec: str | Path, out_dir: str | Path, overrides: dict[str, Any] | None = None) -> list[Path]:
    """Copy ``spec``'s config and tokenizer files (never its weights) into ``out_dir``; returns them.

    ``overrides`` replaces config.json fields (a sibling shape on the same tokenizer); a key the config does
    not have is refused, so a typo cannot silently leave the shape unchanged.

    Raises:
        ValueError: ``out_dir`` is the model's own directory (the copy would be the original).
    """
    from transformers import AutoTokenizer

    from hf_adaptive.models import resolve_model_dir

    src, out = resolve_model_dir(spec), Path(out_dir)
    if out.resolve() == src.resolve():
        raise ValueError(f"out_dir={str(out)!r} is the model's own directory; pass a new directory, "
                         "e.g. .gpu/qwen_cfg.")
    out.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    if overrides:
        import json

        config = json.loads((out / "config.json").read_text())
        unknown = sorted(set(overrides) - set(config))
        if unknown:
            raise ValueError(f"overrides {unknown} are not fields of {src / 'config.json'}; its fields include "
                             f"{sorted(config)[:12]}...")
        config.update(overrides)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    written = sorted(p for p in out.iterdir() if p.is_file())
    weights = [p.name for p in written if p.suffix in WEIGHT_SUFFIXES]
    assert not weights, f"weights leaked into a config-only export: {weights}"
    return written
