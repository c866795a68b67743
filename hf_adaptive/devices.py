"""Checking a ``--device`` against what this torch build and host can run, before anything is loaded.

Contract: pure apart from asking torch how many CUDA devices there are. ``check_device`` raises one
``ValueError`` naming the value, what this host offers and the fix; ``device_argument`` is the same check as an
argparse ``type=`` so the CLI answers with one usage line instead of torch's "not compiled with CUDA" assertion.
"""

from __future__ import annotations

import argparse


def check_device(spec: str | None, cuda_devices: int | None = None) -> str | None:
    """Return ``spec`` if this host can run it (None: the default device). ``cuda_devices``: override of
    ``torch.cuda.device_count()``."""
    if spec is None:
        return None
    import torch  # here, not at import: the CLI checks --device while parsing, and --help must not load torch

    count = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return spec
    if device.type != "cuda":
        raise ValueError(f"--device {spec!r}: only cpu and cuda[:N] are supported; use --device cpu")
    if count == 0:
        build = "a CPU-only torch build" if torch.version.cuda is None else "no visible CUDA device"
        raise ValueError(f"--device {spec!r} asks for CUDA but this host has none ({build}); use --device cpu")
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {spec!r}: this host has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return spec


def device_argument(spec: str) -> str:
    """``check_device`` for argparse's ``type=``."""
    try:
        return check_device(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
