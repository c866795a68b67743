"""Speed evaluation: every setting x batch size on a real-text prompt; JSON + Markdown + PNG.

Contract: ``run_speed_eval(config)`` loads the model (real weights, or random weights of the same
architecture with ``random_weights``), builds a prompt of ``prompt_tokens`` real English tokens
(``evaluation/corpus/english_ppl.txt``), measures each setting with :func:`measure_speed` and writes
``speed.json`` / ``speed.md`` / ``speed.png`` under ``config.out_dir``. Speedup is against the baseline
at the same batch size, same process, same card.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hf_adaptive.evaluation.data import DEFAULT_PPL_TEXT
from hf_adaptive.evaluation.random_model import load_random_model
from hf_adaptive.evaluation.report import environment_info, markdown_table, plot_bars, write_report
from hf_adaptive.evaluation.settings import build_setting, spec_groups
from hf_adaptive.evaluation.report import device_description
from hf_adaptive.evaluation.timing import SpeedConfig, measure_interleaved, real_text_prompt

logger = logging.getLogger(__name__)

RANDOM_SEED = 0  # init seed of --random-weights runs (recorded in the report)

TABLE_COLUMNS = ("setting", "batch_size", "decode_tokens_per_s", "speedup", "ttft_ms", "p50_token_ms",
                 "p99_token_ms", "peak_memory_bytes", "kv_bytes")


@dataclass(frozen=True)
class SpeedEvalConfig:
    """Model, workload and settings of a speed run (recorded in ``speed.json``)."""

    out_dir: Path
    model: str | None = None
    random_weights: bool = False
    device: str | None = None
    dtype: str = "auto"
    settings: tuple[str, ...] = ("baseline", "kv8", "kv4")
    batch_sizes: tuple[int, ...] = (1,)
    prompt_tokens: int = 256
    new_tokens: int = 128
    warmup: int = 1
    repeats: int = 3
    text: Path = DEFAULT_PPL_TEXT


def load_for_speed(config: SpeedEvalConfig) -> tuple[Any, Any]:
    """(model, tokenizer): the real checkpoint, or its architecture with seeded random weights.

    With ``random_weights`` only ``config.json`` and the tokenizer are read (a config-only directory
    from ``scripts/export_model_config.py`` suffices) and the model is built on the target device.
    """
    from hf_adaptive.models import load_model

    if config.random_weights:
        return load_random_model(config.model, device=config.device, dtype=config.dtype, seed=RANDOM_SEED)
    return load_model(config.model, device=config.device, dtype=config.dtype)


def speed_notes(random_weights: bool) -> str:
    """The Markdown notes of a speed report: definitions, and what random weights do and do not change."""
    notes = ("Medians over repeats after warm-up; repeats interleaved round-robin across settings. "
             "decode tokens/s = batch x (steps-1) / decode time; "
             "TTFT includes prefill; per-token latency from a LogitsProcessor stamping each step "
             "(CUDA-synchronized on GPU). Peak memory: CUDA max allocated, or process peak RSS on CPU.\n")
    if random_weights:
        notes += ("\nRandom weights of the real architecture (config.json only, no checkpoint read): speed "
                  "depends on shapes and dtypes, not on weight values, and EOS is ignored "
                  "(min_new_tokens = new_tokens), so every run decodes the same number of tokens.\n")
    return notes


def _row(result: dict[str, Any], batch_size: int, base_tps: float) -> dict[str, Any]:
    kv = [r["stats"].get("kv_bytes") for r in result["runs"] if "kv_bytes" in r.get("stats", {})]
    return {"setting": result["setting"], "batch_size": batch_size,
            **{k: result[k] for k in ("decode_tokens_per_s", "ttft_ms", "p50_token_ms", "p99_token_ms",
                                      "peak_memory_bytes")},
            "speedup": result["decode_tokens_per_s"] / base_tps if base_tps else 0.0,
            "kv_bytes": kv[-1] if kv else None}


def run_speed_eval(config: SpeedEvalConfig, progress: bool = True) -> dict[str, Any]:
    """Measure, write the report, return ``{"rows", "paths"}``."""
    from tqdm.auto import tqdm

    model, tokenizer = load_for_speed(config)
    text = Path(config.text).read_text(encoding="utf-8")
    rows, raw = [], []
    base_tps: dict[int, float] = {}
    jobs = [(g, b) for g in spec_groups(["baseline", *config.settings]) for b in config.batch_sizes]
    for group, batch_size in tqdm(jobs, desc="speed (group x batch)", disable=not progress):
        workload = SpeedConfig(batch_size, config.prompt_tokens, config.new_tokens, config.warmup,
                               config.repeats)
        ids = real_text_prompt(tokenizer, text, config.prompt_tokens, batch_size).to(model.device)
        settings = [build_setting(spec, model) for spec in group]
        for result in measure_interleaved(model, ids, settings, workload):
            base_tps.setdefault(batch_size, result["decode_tokens_per_s"])  # baseline comes first
            rows.append(_row(result, batch_size, base_tps[batch_size]))
            raw.append(result)
            logger.info("%s b=%d: %.1f tok/s", result["setting"], batch_size, result["decode_tokens_per_s"])
    card = device_description(model.device)
    env = {**environment_info(str(model.device), card), "model": config.model or "smollm2-135m-instruct",
           "weights": "random" if config.random_weights else "real", "dtype": str(model.dtype)}
    if config.random_weights:
        env["weights_init"] = (f"from_config on {model.device}, transformers' normal init "
                               f"(std {getattr(model.config, 'initializer_range', '?')}), seed {RANDOM_SEED}")
    payload = {"config": {**asdict(config), "out_dir": str(config.out_dir), "text": str(config.text)},
               "summary": rows, "results": raw}
    paths = write_report(config.out_dir, "speed", payload, env, markdown_table(rows, TABLE_COLUMNS),
                         f"Decode speed: {env['model']} ({env['weights']} weights) on {card}",
                         speed_notes(config.random_weights))
    paths["png"] = plot_bars(Path(config.out_dir) / "speed.png",
                             [f"{r['setting']} b{r['batch_size']}" for r in rows],
                             [r["decode_tokens_per_s"] for r in rows],
                             f"{env['model']} ({env['weights']}), {card}, prompt {config.prompt_tokens}, "
                             f"new {config.new_tokens}", "decode tokens/s")
    return {"rows": rows, "paths": paths}
