"""AdaptiveKVCache quality on real English text vs DynamicCache: top-1 agreement, perplexity delta, greedy drift.

One command (CPU or GPU):
    python eval/kv_quality.py --out eval/results/quality_kv_smollm2_cpu

Settings compared with DynamicCache on the same model: a budget that forces 8 bits, a budget that forces
8 then 4 bits (and demotion), and the fixed rungs 8 and 4. Teacher forcing feeds ``--tokens`` tokens of
the package's English text (evaluation/corpus/english_ppl.txt) in chunks of ``--chunk`` tokens, so every chunk after the first reads its history
from the cache (quantized blocks included). Greedy drift: tokens generated identically from a
``--prompt-tokens`` prompt before the first divergence. Writes kv_quality.json / .md / .png under ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import environment  # first: sets the offline default
import torch
from tqdm import tqdm

from hf_adaptive.evaluation.data import DEFAULT_PPL_TEXT
from hf_adaptive.evaluation.kv_quality import compare, reference_run
from hf_adaptive.evaluation.report import markdown_table, plot_bars, write_report
from hf_adaptive.kv.cache import AdaptiveKVCache

DATA = DEFAULT_PPL_TEXT


def bytes_per_token_16(model, dtype: torch.dtype) -> int:
    """KV bytes one token takes in the model dtype, all layers."""
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_key_value_heads * head_dim * torch.empty((), dtype=dtype).element_size() * cfg.num_hidden_layers


def settings(model, args) -> dict[str, dict]:
    """name -> AdaptiveKVCache kwargs. Budgets are fractions of what the whole text takes at 16 bits."""
    full = bytes_per_token_16(model, getattr(torch, args.dtype)) * args.tokens
    common = dict(residual_length=args.residual_length, block_size=args.block_size, backend=args.backend)
    return {
        "budget_8bit": dict(memory_budget=int(full / 0.80), **common),  # peaks between the 8- and 4-bit thresholds
        "budget_8_then_4bit": dict(memory_budget=int(full * 0.55), **common),
        "fixed_8bit": dict(fixed_bits=8, **common),
        "fixed_4bit": dict(fixed_bits=4, **common),
    }


def evaluate(model, ids: torch.Tensor, args) -> list[dict]:
    rows = []
    ref = reference_run(model, ids, args.chunk, args.prompt_tokens, args.new_tokens)
    for name, kwargs in tqdm(settings(model, args).items(), desc="kv_quality"):
        agreement, probe = compare(model, ids, lambda: AdaptiveKVCache(model.config, **kwargs), ref)
        stats = probe.stats()
        bits = [h["bits"] for h in probe.history]
        rows.append({"setting": name, "top1_agreement": agreement.top1_agreement,
                     "ppl_dynamic": agreement.ppl_reference, "ppl_adaptive": agreement.ppl_test,
                     "ppl_delta_pct": 100 * agreement.ppl_delta_fraction,
                     "greedy_identical_prefix": f"{agreement.greedy_match_prefix}/{agreement.greedy_tokens}",
                     "kv_ratio_vs_bf16": stats["ratio"], "rungs_seen": "->".join(str(b) for b in _runs(bits)),
                     "demotions": stats["demotions"], "kv_bytes": stats["kv_bytes"],
                     "memory_budget": kwargs.get("memory_budget")})
    return rows


def _runs(bits: list[int]) -> list[int]:
    return [b for i, b in enumerate(bits) if i == 0 or b != bits[i - 1]]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="embedded model name or local checkpoint (default SmolLM2)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--tokens", type=int, default=1024, help="tokens of text for teacher forcing")
    p.add_argument("--chunk", type=int, default=32, help="tokens per forward step in teacher forcing")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--residual-length", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--backend", default="torch", choices=("torch", "hqq"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="float32 (default, CPU-exact) or bfloat16")
    p.add_argument("--out", default="eval/results/quality_kv_smollm2_cpu")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not Path(args.data).is_file():
        raise SystemExit(f"kv_quality: --data {args.data} does not exist; the default ships with the package "
                         f"({DEFAULT_PPL_TEXT}); pass --data PATH to any plain English text file.")
    from hf_adaptive.models import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    ids = tok(Path(args.data).read_text(encoding="utf-8"), return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"kv_quality: {args.data} has only {ids.shape[1]} tokens; need --tokens={args.tokens}.")
    rows = evaluate(model.eval(), ids.to(args.device), args)
    env = environment(args.device, model=args.model or "smollm2-135m-instruct", dtype=args.dtype, data=args.data,
                      tokens=args.tokens, chunk=args.chunk)
    card = env["card"]
    columns = ["setting", "top1_agreement", "ppl_dynamic", "ppl_adaptive", "ppl_delta_pct", "greedy_identical_prefix",
               "kv_ratio_vs_bf16", "rungs_seen", "demotions"]
    notes = ("kv_ratio_vs_bf16 is measured in the run's dtype (float32 tensors count 4 bytes: a 16-bit stage then "
             "shows 2.0). Budgets are fractions of the whole text's 16-bit KV bytes.")
    write_report(args.out, "kv_quality", {"rows": rows, "args": vars(args)}, env, markdown_table(rows, columns),
                 f"AdaptiveKVCache quality vs DynamicCache ({card})", notes)
    plot_bars(Path(args.out) / "kv_quality.png", [r["setting"] for r in rows], [r["top1_agreement"] for r in rows],
              f"teacher-forced top-1 agreement with DynamicCache ({card})", "agreement")
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
