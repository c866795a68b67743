"""Read a calibration JSON (``cost_model.Calibration``), checking every field where it enters.

Contract: pure (no torch). ``read_calibration(path)`` returns a ``Calibration`` or raises one ``ValueError`` /
``TypeError`` whose single line names the file, the line of the field, the field (``plans.tp2.decode_ms_base``),
the value and a fix. The ranges themselves live in ``PlanCost`` / ``Calibration.__post_init__`` (so a calibration
built in code is checked alike); this module adds the file's structure and the places. Top-level keys other than
the ones ``Calibration`` reads (``points``, notes) are kept out of the way; unknown coefficients of a plan are
refused, since a misspelt one would silently read as 0.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from hf_adaptive.parallel.cost_model import Calibration, PlanCost
from hf_adaptive.validation import (FieldTypeError, FieldValueError, check_number, check_type, located,
                                    read_text_file)

REFIT = "re-run eval/calibrate_parallel.py or eval/calibrate_from_serve.py to write a complete calibration"
DIMS = ("num_layers", "num_heads", "num_kv_heads", "intermediate_size")


def read_calibration(path: str | Path) -> Calibration:
    """The checked ``Calibration`` in ``path`` (see the module docstring)."""
    text = read_text_file(path, "calibration", f"pass a calibration JSON, e.g. eval/calibration/"
                                               f"parallel_cpu_gloo_2proc.json, or {REFIT}")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise FieldValueError(f"{path}:{err.lineno}: not JSON ({err.msg}, column {err.colno}). Fix: repair the "
                              f"file or {REFIT}.", "file") from None
    except (ValueError, RecursionError) as err:
        raise FieldValueError(f"{path}: not a usable JSON document ({type(err).__name__}). Fix: {REFIT}.",
                              "file") from None
    try:
        return calibration_from_dict(raw)
    except (FieldValueError, FieldTypeError) as err:
        raise located(err, f"{path}:{line_of(text, err.field)}: ") from None


def calibration_from_dict(raw: Any) -> Calibration:
    """A ``Calibration`` from the parsed JSON; errors carry the dotted field they concern."""
    check_type(raw, "the calibration", dict, f"a JSON object with world_size, plans, ...; {REFIT}")
    for key in ("world_size", "device_memory_bytes", "switch_cost_ms", "plans"):
        if key not in raw:
            raise FieldValueError(f"field {key!r} is missing. Fix: {REFIT}.", key)
    plans = check_type(raw["plans"], "plans", dict, f'"plans": {{"tp2": {{...}}}}; {REFIT}')
    meta = check_type(raw.get("meta", {}), "meta", dict, f'"meta": {{"dims": {{...}}}}; {REFIT}')
    if "dims" in meta:
        _check_dims(meta["dims"])
    warm = check_type(raw.get("warm_batch_extra_ms", []), "warm_batch_extra_ms", list, '"warm_batch_extra_ms": []')
    try:
        return Calibration(world_size=raw["world_size"], device_memory_bytes=raw["device_memory_bytes"],
                           switch_cost_ms=raw["switch_cost_ms"], plans={k: _plan(k, v) for k, v in plans.items()},
                           meta=meta, memory_headroom=raw.get("memory_headroom", 0.0), warm_batch_extra_ms=tuple(warm))
    except (FieldValueError, FieldTypeError):
        raise
    except (ValueError, TypeError) as err:  # a message without a field: place it at the top
        raise FieldValueError(f"{err} Fix: {REFIT}.", "") from None


def _plan(name: str, coeffs: Any) -> PlanCost:
    where = f"plans.{name}"
    check_type(coeffs, where, dict, f'"{name}": {{"prefill_ms_base": 1.0, ...}}; {REFIT}')
    known = {f.name for f in fields(PlanCost)}
    required = {f.name for f in fields(PlanCost) if f.default is MISSING}
    unknown, missing = sorted(set(coeffs) - known), sorted(required - set(coeffs))
    if unknown:
        raise FieldValueError(f"{where}: unknown coefficient(s) {unknown}; allowed: {sorted(known)}. "
                              f"Fix: correct the name or {REFIT}.", f"{where}.{unknown[0]}")
    if missing:
        raise FieldValueError(f"{where} lacks {missing}. Fix: {REFIT}.", where)
    try:
        return PlanCost(**coeffs)
    except (FieldValueError, FieldTypeError) as err:
        raise type(err)(f"{where}.{err}", f"{where}.{err.field}") from None


def _check_dims(dims: Any) -> None:
    check_type(dims, "meta.dims", dict, f'"dims": {{"num_layers": 30, "num_heads": 9, ...}}; {REFIT}')
    if sorted(dims) != sorted(DIMS):
        raise FieldValueError(f"meta.dims must have exactly the keys {list(DIMS)}; got {sorted(dims)}. "
                              f"Fix: {REFIT}.", "meta.dims")
    for key in DIMS:
        check_number(dims[key], f"meta.dims.{key}", minimum=1, integer=True, fix=f'"{key}": 8')


def line_of(text: str, dotted: str) -> int:
    """The line of the deepest key of ``dotted`` (``plans.tp2.decode_ms_base``) found in order in ``text``;
    1 when none is (a JSON document keeps no positions, so the keys are searched as written)."""
    pos, found = 0, 0
    for key in filter(None, dotted.split(".")):
        at = text.find(json.dumps(key), pos)
        if at < 0:
            break
        pos = found = at
    return text.count("\n", 0, found) + 1
