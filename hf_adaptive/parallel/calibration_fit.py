"""Fit ``PlanCost`` latency coefficients from the batch records of real serving runs.

Contract: pure (numpy, no torch). ``batches_of(run)`` turns one serving report (``<mode>.json`` of
``telemetry.write_report``) into batches with the busiest replica's shape; ``fit_latency`` fits the five latency
terms of ``PlanCost.batch_ms`` to their durations; ``fit_warm_extra`` measures how much slower the first batches after
a layout change run than the fitted steady state; ``weights_per_device`` is the analytic weight bytes on a plan's
busiest device, from a transformers config. ``eval/calibrate_from_serve.py`` writes the calibration file.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from hf_adaptive.parallel.plans import ParallelPlan
from hf_adaptive.parallel.requests import Request, route
from hf_adaptive.validation import FieldValueError, check_number, check_type

LATENCY_KEYS = ("prefill_ms_base", "prefill_ms_per_token", "decode_ms_base", "decode_ms_per_seq",
                "decode_ms_per_ctx_token")


def batches_of(run: dict) -> list[dict]:
    """One entry per batch of a ``<mode>.json``: plan, duration, the busiest replica's shape, and ``since_switch``:
    how many batches ran on this layout before it since the run started or last changed layout (0: the first)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in _records(run):
        groups[(r["plan"], r["start_s"], r["finish_s"])].append(r)
    out: list[dict] = []
    for (plan_name, start, end), rows in sorted(groups.items(), key=lambda kv: kv[0][1]):
        plan = ParallelPlan.parse(plan_name)
        reqs = [Request(r["id"], 0.0, r["new_tokens"], prompt_ids=[0] * r["prompt_tokens"]) for r in rows]
        shares = [s for s in route(reqs, plan.dp) if s]
        busiest = max(shares, key=lambda s: (len(s) * max(len(r.prompt_ids) for r in s), len(s)))
        since = out[-1]["since_switch"] + 1 if out and out[-1]["plan"] == plan_name else 0
        out.append({"plan": plan_name, "seconds": end - start, "rows": len(busiest),
                    "width": max(len(r.prompt_ids) for r in busiest),
                    "new": max(r.max_new_tokens for r in busiest), "since_switch": since})
    return out


def _records(run: dict) -> list[dict]:
    """The report's request records, each field checked (a report is a file a person may have edited)."""
    fix = "pass a <mode>.json written by telemetry.write_report"
    check_type(run, "the serving report", dict, fix)
    records = check_type(run.get("requests"), "requests", list, fix)
    for i, r in enumerate(records):
        where = f"requests[{i}]"
        check_type(r, where, dict, fix)
        missing = sorted({"id", "plan", "start_s", "finish_s", "prompt_tokens", "new_tokens"} - set(r))
        if missing:
            raise FieldValueError(f"{where} lacks {missing}. Fix: {fix}.", where)
        try:
            ParallelPlan.parse(check_type(r["plan"], f"{where}.plan", str, fix))
        except ValueError as err:
            raise FieldValueError(f"{where}.plan: {err}", f"{where}.plan") from None
        start = check_number(r["start_s"], f"{where}.start_s", minimum=0.0, fix='"start_s": 0.0')
        check_number(r["finish_s"], f"{where}.finish_s", minimum=start, fix=f'"finish_s": {start} or later')
        for name, least in (("prompt_tokens", 1), ("new_tokens", 0)):
            check_number(r[name], f"{where}.{name}", minimum=least, integer=True, fix=f'"{name}": 8')
    return records


def features(rows: int, width: int, new: int) -> list[float]:
    """The ``PlanCost.batch_ms`` terms, one per latency coefficient (same order as ``LATENCY_KEYS``)."""
    return [1.0, rows * width, new, new * rows, new * rows * (width + new / 2.0)]


def fit_latency(batches: list[dict]) -> dict[str, float]:
    """Non-negative least squares by elimination: fit, drop the negative coefficients, refit the rest."""
    if not batches:
        raise ValueError("fit_latency: no batches to fit. Fix: pass the batches_of() of a serving run that served "
                         "requests on this plan.")
    x = np.array([features(b["rows"], b["width"], b["new"]) for b in batches])
    y = np.array([b["seconds"] * 1e3 for b in batches])
    active = list(range(x.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (coef >= 0).all() or len(active) == 1:
            break
        active = [a for a, c in zip(active, coef) if c >= 0]
    full = np.zeros(x.shape[1])
    full[active] = np.clip(coef, 0, None)
    return dict(zip(LATENCY_KEYS, map(float, full)))


def fit_warm_extra(batches: list[dict], fitted_s: list[float], warm_batches: int) -> list[float]:
    """Extra milliseconds of the first ``warm_batches`` batches after a layout change, one per position.

    ``fitted_s[i]`` is the steady-state time of ``batches[i]`` (from coefficients fitted on later batches); the
    extra of position ``k`` is the median of measured minus fitted over the batches with ``since_switch == k``,
    floored at 0 (0 when no batch sits there).
    """
    if len(fitted_s) != len(batches):
        raise ValueError(f"fitted_s has {len(fitted_s)} entries for {len(batches)} batches; give one per batch")
    extra = []
    for k in range(warm_batches):
        residuals = [b["seconds"] - f for b, f in zip(batches, fitted_s) if b["since_switch"] == k]
        extra.append(max(0.0, float(np.median(residuals))) * 1e3 if residuals else 0.0)
    return extra


def weights_per_device(config: Any, plan: ParallelPlan, dtype_bytes: int) -> float:
    """Bytes of weights on the busiest device of ``plan`` (embeddings and lm_head stay whole under TP).

    Analytic for a Llama/Qwen2-style decoder (q/k/v biases counted, as Qwen2 has them; extra norms such as
    Gemma's are not): exact for Qwen2 (the tests compare it with a real model's parameter bytes).
    """
    text = getattr(config, "text_config", None) or config
    h, inter, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    attn = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2 + (heads + 2 * kv_heads) * head_dim  # q,o,k,v,bias
    layer = attn + 3 * h * inter + 2 * h
    embed = text.vocab_size * h
    head = 0 if getattr(text, "tie_word_embeddings", False) else embed
    per_stage = -(-layers // plan.pp) * layer / plan.tp
    first = embed + per_stage + (head + h if plan.pp == 1 else 0)
    last = per_stage + head + h
    return max(first, last) * dtype_bytes
