"""Manifests of converted checkpoints: each file's size and SHA-256, written last and atomically.

Contract: pure Python (hashlib, json, os). ``write_manifest(folder)`` records every file under ``folder`` in
``MANIFEST_NAME``, written to a temporary name and renamed into place as the conversion's last step, so a folder
without a manifest is an interrupted or foreign conversion. ``checkpoint_problem(folder)`` returns why the folder
does not match its manifest (missing, truncated or changed file, no manifest), or None when it matches.

Hashing a multi-gigabyte checkpoint at every load would cost seconds, so a successful check records each file's
size and modification time (``STAMP_NAME``); a later check hashes only the files whose size or time changed since
(zeroing or truncating a file in place changes its modification time). Sizes are always compared.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_NAME = "hf_adaptive_manifest.json"
STAMP_NAME = "hf_adaptive_verified.json"
MANIFEST_VERSION = 1


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST_NAME, STAMP_NAME)
                  and not p.name.endswith(".tmp"))


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: two checks may stamp at once
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers see the old file or the whole new one, never a part


def write_manifest(folder: Path, source: str = "") -> dict:
    """Record every file of ``folder`` (size, SHA-256) in its manifest; call it after the last file is written."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _model_files(folder)}
    manifest = {"version": MANIFEST_VERSION, "source": source, "files": files}
    _write_json_atomic(folder / MANIFEST_NAME, manifest)
    _write_stamp(folder, files)
    return manifest


def _write_stamp(folder: Path, files: dict) -> None:
    stamp = {}
    for name in files:
        st = (folder / name).stat()
        stamp[name] = [st.st_size, st.st_mtime_ns]
    _write_json_atomic(folder / STAMP_NAME, stamp)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` does not match its manifest, or None when every listed file has its size and hash."""
    manifest = _read_json(folder / MANIFEST_NAME)
    files = manifest.get("files") if manifest else None
    if not isinstance(files, dict) or not files:
        return f"it has no readable {MANIFEST_NAME} (an interrupted conversion, or one by an older version)"
    stamp = _read_json(folder / STAMP_NAME) or {}
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        st = path.stat()
        if not isinstance(entry, dict) or st.st_size != entry.get("size"):
            return f"{name} has {st.st_size} bytes where the manifest records {entry.get('size')} (truncated?)"
        if stamp.get(name) == [st.st_size, st.st_mtime_ns]:
            continue  # hashed when it had exactly this size and time
        if sha256_file(path) != entry.get("sha256"):
            return f"{name} does not match its recorded SHA-256 (changed or damaged data)"
    try:
        _write_stamp(folder, files)
    except OSError:  # a read-only cache: the next check hashes again, nothing else changes
        pass
    return None
