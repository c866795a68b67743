"""`hf-adaptive eval bleu ...` and `hf-adaptive eval speed ...`: BLEU drift and decode speed.

Reads the command line, builds :class:`BleuEvalConfig` / :class:`SpeedEvalConfig`, calls the library
(``hf_adaptive.evaluation.bleu`` / ``speed``) and prints the summary table and written paths.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_adaptive.commands.common import MODEL_HELP
from hf_adaptive.devices import device_argument
from hf_adaptive.evaluation.data import DEFAULT_DEV_SET, DEFAULT_PPL_TEXT
from hf_adaptive.models import DTYPES, check_device, offline_unless_hub
from hf_adaptive.validation import arg_number


def _csv(cast, sep: str = ","):
    def parse(text: str):
        try:
            return tuple(cast(x.strip()) for x in text.split(sep) if x.strip())
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise argparse.ArgumentTypeError(f"expected a {sep!r}-separated list; got {text!r} ({err})")
    return parse


POSITIVE_INT = arg_number(minimum=1, integer=True)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--device", default=None, type=device_argument,
                        help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto (bf16 on CUDA, fp32 on CPU), or a dtype")
    parser.add_argument("--settings", type=_csv(str, ";"), default=("baseline", "kv8", "kv4"),
                        help="';'-separated setting specs, e.g. 'baseline;kv8;kv4;kv:bits=4,residual_length=16;"
                             "precision:high=0.9,low=0.6' (baseline is always added)")
    parser.add_argument("--kv-bits", type=_csv(POSITIVE_INT), default=(),
                        help="sweep: adds kv<bits> settings, e.g. 8,4,2")
    parser.add_argument("--kv-budgets", type=_csv(str), default=(),
                        help="sweep: adds kv:memory_budget=<b> settings, e.g. 8MiB,4MiB")
    parser.add_argument("--precision-thresholds", type=_csv(arg_number(minimum=0.0, maximum=1.0)), default=(),
                        help="sweep: adds precision:high=<t> settings, e.g. 0.95,0.9,0.8")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None,
                        help="torch CPU threads (torch.set_num_threads); 1 avoids oversubscription on busy hosts")
    parser.add_argument("--out", type=Path, required=True, help="results directory")


def sweep_settings(args: argparse.Namespace) -> tuple[str, ...]:
    """``--settings`` plus the settings the sweep options add (order kept, duplicates dropped)."""
    specs = list(args.settings)
    specs += [f"kv{b}" for b in args.kv_bits]
    specs += [f"kv:memory_budget={b}" for b in args.kv_budgets]
    specs += [f"precision:high={t},low={min(t, 0.6)}" for t in args.precision_thresholds]
    return tuple(dict.fromkeys(specs))


def eval_command_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eval", help="BLEU drift and decode speed on real models and text")
    sub = parser.add_subparsers(dest="eval_command", required=True)
    bleu = sub.add_parser("bleu", help="translate Spanish verses, BLEU/chrF drift vs the baseline")
    _common(bleu)
    bleu.add_argument("--data", type=Path, default=DEFAULT_DEV_SET, help="aligned verses (JSONL)")
    bleu.add_argument("--limit", type=POSITIVE_INT, default=None, help="first N verses only")
    bleu.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    bleu.add_argument("--new-tokens-factor", type=arg_number(minimum=0.0, min_open=True), default=2.0,
                      help="max_new_tokens = factor x longest source (tokens) in the batch")
    bleu.set_defaults(func=eval_command)
    speed = sub.add_parser("speed", help="decode tokens/s, TTFT, p50/p99 latency, peak memory")
    _common(speed)
    speed.add_argument("--random-weights", action="store_true",
                       help="same architecture, seeded random weights built on --device from config.json + "
                            "tokenizer only (no weights read; see scripts/export_model_config.py)")
    speed.add_argument("--batch-sizes", type=_csv(POSITIVE_INT), default=(1,), help="e.g. 1,8")
    speed.add_argument("--prompt-tokens", type=POSITIVE_INT, default=256)
    speed.add_argument("--new-tokens", type=POSITIVE_INT, default=128)
    speed.add_argument("--warmup", type=arg_number(minimum=0, integer=True), default=1)
    speed.add_argument("--repeats", type=POSITIVE_INT, default=3)
    speed.add_argument("--text", type=Path, default=DEFAULT_PPL_TEXT, help="real text for the prompt")
    speed.set_defaults(func=eval_command)
    return parser


def _print(rows: list[dict], columns: tuple[str, ...], paths: dict) -> None:
    from hf_adaptive.evaluation.report import markdown_table

    print(markdown_table(rows, columns))
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")


def eval_command(args: argparse.Namespace) -> int:
    offline_unless_hub(args.model)
    args.device = check_device(args.device)  # a missing CUDA is one line here, not an AssertionError mid-run
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    common = dict(out_dir=args.out, model=args.model, device=args.device, dtype=args.dtype,
                  settings=sweep_settings(args))
    if args.eval_command == "bleu":
        from hf_adaptive.evaluation.bleu import TABLE_COLUMNS, BleuEvalConfig, run_bleu_eval
        from hf_adaptive.evaluation.translate import TranslationConfig

        translation = TranslationConfig(batch_size=args.batch_size, new_tokens_factor=args.new_tokens_factor)
        result = run_bleu_eval(BleuEvalConfig(data=args.data, limit=args.limit, translation=translation,
                                              **common))
        print(f"BLEU signature: {result['summary'][0]['bleu_signature']}")
        _print(result["summary"], TABLE_COLUMNS, result["paths"])
        return 0
    from hf_adaptive.evaluation.speed import TABLE_COLUMNS, SpeedEvalConfig, run_speed_eval

    result = run_speed_eval(SpeedEvalConfig(random_weights=args.random_weights, batch_sizes=args.batch_sizes,
                                            prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                            warmup=args.warmup, repeats=args.repeats, text=args.text, **common))
    _print(result["rows"], TABLE_COLUMNS, result["paths"])
    return 0
