"""BLEU-drift evaluation: translate the dev set under each setting, score, compare with the baseline.

Contract: ``run_bleu_eval(config)`` loads the model and data, runs every setting (baseline first), and
writes ``bleu.json`` / ``bleu.md`` / ``bleu_pareto.png`` under ``config.out_dir``. Speedup on the plot is
the setting's translation throughput (generated tokens / generate seconds, batched) over the baseline's,
measured in the same process on the same card.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hf_adaptive.evaluation.data import DEFAULT_DEV_SET, DEFAULT_REFERENCE_FIELDS, load_parallel, references_of
from hf_adaptive.evaluation.metrics import load_sacrebleu_metric, quality_summary
from hf_adaptive.evaluation.report import environment_info, markdown_table, plot_pareto, write_report
from hf_adaptive.evaluation.settings import build_setting, order_specs
from hf_adaptive.evaluation.speed import device_description
from hf_adaptive.evaluation.translate import TranslationConfig, translate

logger = logging.getLogger(__name__)

TABLE_COLUMNS = ("setting", "bleu", "chrf", "bleu_drift", "chrf_drift", "self_bleu", "token_match_rate",
                 "exact_match_fraction", "tokens_per_s", "speedup", "kv_ratio")


@dataclass(frozen=True)
class BleuEvalConfig:
    """What to evaluate and where to write it (all of it is recorded in ``bleu.json``)."""

    out_dir: Path
    model: str | None = None
    data: Path = DEFAULT_DEV_SET
    limit: int | None = None
    settings: tuple[str, ...] = ("baseline", "kv8", "kv4")
    device: str | None = None
    dtype: str = "auto"
    reference_fields: tuple[str, ...] = DEFAULT_REFERENCE_FIELDS
    translation: TranslationConfig = field(default_factory=TranslationConfig)


def _kv_ratio(batches: list[dict[str, Any]]) -> float | None:
    """KV bytes / bf16-equivalent bytes over all batches (None for settings without a KV cache)."""
    stats = [b["stats"] for b in batches if "kv_bytes" in b.get("stats", {})]
    bf16 = sum(s["bf16_equivalent_bytes"] for s in stats)
    return sum(s["kv_bytes"] for s in stats) / bf16 if stats and bf16 else None


def summarize(results: dict[str, dict[str, Any]], references: list[list[str]]) -> list[dict[str, Any]]:
    """One row per setting: scores, drift and agreement vs ``results["baseline"]``, speedup."""
    base = {**results["baseline"], "references": references}
    rows = []
    for name, result in results.items():
        row = quality_summary(name, {**result, "references": references}, base)
        row["tokens_per_s"] = result["tokens_per_s"]
        row["speedup"] = result["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else 0.0
        row["kv_ratio"] = _kv_ratio(result["batches"])
        rows.append(row)
    return rows


def _write(config: BleuEvalConfig, env: dict[str, Any], rows: list[dict[str, Any]],
           results: dict[str, dict[str, Any]], ids: list[str]) -> dict[str, Path]:
    model_name = config.model or "smollm2-135m-instruct"
    payload = {"config": {**asdict(config), "out_dir": str(config.out_dir), "data": str(config.data)},
               "summary": rows,
               "outputs": {name: {"hypotheses": dict(zip(ids, r["hypotheses"])), "batches": r["batches"],
                                  "generated_tokens": r["generated_tokens"], "seconds": r["seconds"]}
                           for name, r in results.items()}}
    notes = (f"Signatures: BLEU `{rows[0]['bleu_signature']}`; chrF `{rows[0]['chrf_signature']}`.\n\n"
             f"{len(ids)} verses of `{config.data.name}` (limit {config.limit}), references "
             f"{list(config.reference_fields)}; greedy, batch {config.translation.batch_size}, left padding, "
             f"max_new_tokens = {config.translation.new_tokens_factor} x longest source in the batch.\n"
             "drift = (setting - baseline) / baseline; self_bleu = BLEU against the baseline's own output; "
             "speedup = generated tokens/s over the baseline's, same process and card; "
             "kv_ratio = KV bytes / bf16 bytes.\n")
    if env["device"] == "cpu":
        notes += ("\nCPU timings: settings run one after another, so on a shared host load changes between "
                  "them skew the speedup; trust the quality columns, re-measure speed on a quiet machine.\n")
    paths = write_report(config.out_dir, "bleu", payload, env, markdown_table(rows, TABLE_COLUMNS),
                         f"BLEU drift: {model_name} on {env['card']}", notes)
    paths["png"] = plot_pareto(Path(config.out_dir) / "bleu_pareto.png", [r["setting"] for r in rows],
                               [r["speedup"] for r in rows], [r["bleu"] for r in rows],
                               f"{model_name}, {len(ids)} verses, {env['card']}")
    return paths


def run_bleu_eval(config: BleuEvalConfig, progress: bool = True) -> dict[str, Any]:
    """Run the evaluation and write its report; returns ``{"summary", "paths"}``."""
    from hf_adaptive.models import load_model

    load_sacrebleu_metric()  # fail fast (missing evaluate/sacrebleu) before hours of generation
    model, tokenizer = load_model(config.model, device=config.device, dtype=config.dtype)
    dataset = load_parallel(config.data, config.limit, reference_fields=config.reference_fields)
    references = references_of(dataset, config.reference_fields)
    specs = order_specs(["baseline", *config.settings])
    results = {}
    for spec in specs:
        setting = build_setting(spec, model)
        results[spec] = translate(model, tokenizer, dataset["es"], setting, config.translation, progress)
    rows = summarize(results, references)
    for row in rows:
        logger.info("%s: BLEU %.2f (drift %+.1f%%) chrF %.2f speedup %.2fx", row["setting"], row["bleu"],
                    100 * row["bleu_drift"], row["chrf"], row["speedup"])
    env = environment_info(str(model.device), device_description(model.device))
    env["model"] = config.model or "smollm2-135m-instruct"
    env["dtype"] = str(model.dtype)
    paths = _write(config, env, rows, results, dataset["id"])
    return {"summary": rows, "paths": paths}
