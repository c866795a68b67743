"""`hf-adaptive generate "prompt"`: generate with the adaptive KV cache and print a short report.

The report shows the KV precision over the decode steps, the bytes the cache holds against the bf16
equivalent, and the decode speed. Works offline on the embedded default model.
"""

from __future__ import annotations

import argparse
import json

from hf_adaptive.commands.common import (
    add_generation_arguments,
    chat_inputs,
    load_for_command,
    sampling_kwargs,
    wall_clock,
)
from hf_adaptive.validation import arg_number

DEFAULT_PROMPT = "Explain in three sentences why a key-value cache makes text generation faster."


def generate_command_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("generate", help="generate text with the adaptive KV cache",
                                   description=__doc__.splitlines()[0])
    add_generation_arguments(parser, DEFAULT_PROMPT, max_new_tokens=128,
                             sample_help="sample (temperature 0.7) instead of greedy",
                             json_help="also write the full report here")
    parser.add_argument("--memory-budget", default=None,
                        help="KV byte budget, e.g. 256KiB or 2GiB; the cache steps down to 8 and 4 bits to stay under it")
    parser.add_argument("--gpu-memory-fraction", type=arg_number(minimum=0.0, maximum=1.0, min_open=True),
                        default=None,
                        help="instead of a budget: target fraction of live GPU memory (CUDA only)")
    parser.add_argument("--fixed-bits", type=int, default=None, choices=(8, 4, 2),
                        help="store every cold token at this precision, ignoring pressure")
    parser.add_argument("--backend", default="torch", choices=("torch", "hqq"), help="KV quantizer")
    parser.set_defaults(func=generate_command)
    return parser


def generate_command(args: argparse.Namespace) -> int:
    from hf_adaptive.kv.config import KVCacheConfig

    KVCacheConfig(memory_budget=args.memory_budget, backend=args.backend, fixed_bits=args.fixed_bits,
                  gpu_memory_fraction=args.gpu_memory_fraction)  # bad settings fail before the model loads
    model, tokenizer = load_for_command(args)
    import torch

    from hf_adaptive.compat import generate_cache_kwargs
    from hf_adaptive.kv.cache import AdaptiveKVCache

    cache = AdaptiveKVCache(model.config, memory_budget=args.memory_budget, backend=args.backend,
                            fixed_bits=args.fixed_bits, gpu_memory_fraction=args.gpu_memory_fraction)
    inputs = chat_inputs(tokenizer, args.prompt).to(model.device)
    with wall_clock(model.device) as clock, torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                             **sampling_kwargs(args.sample), **generate_cache_kwargs(cache))
    seconds = clock["seconds"]
    new_tokens = out[0, inputs["input_ids"].shape[1]:]
    print(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    report = build_report(cache, n_new=int(new_tokens.numel()), seconds=seconds,
                          element_bytes=model.dtype.itemsize if hasattr(model.dtype, "itemsize") else 2)
    report["model_dtype"] = str(model.dtype).removeprefix("torch.")
    print(format_report(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"report": report, "stats": cache.stats(), "history": cache.history}, f, indent=2)
    return 0


def bits_timeline(history: list[dict]) -> list[tuple[int, int, int]]:
    """Run-length view of the precision new cold tokens got: ``[(first_step, last_step, bits), ...]``."""
    runs: list[tuple[int, int, int]] = []
    for record in history:
        step, bits = record["step"], record["bits"]
        if runs and runs[-1][2] == bits:
            runs[-1] = (runs[-1][0], step, bits)
        else:
            runs.append((step, step, bits))
    return runs


def build_report(cache, n_new: int, seconds: float, element_bytes: int = 2) -> dict:
    """The numbers the CLI prints: precision timeline, bytes vs bf16 and vs the model's own dtype, tokens/s
    (prefill included). ``element_bytes`` is the model dtype's size (4 on CPU, where models run in fp32)."""
    stats = cache.stats()
    native = stats["bf16_equivalent_bytes"] * element_bytes // 2
    return {"new_tokens": n_new, "seconds": seconds, "tokens_per_s": n_new / seconds if seconds > 0 else 0.0,
            "kv_bytes": stats["kv_bytes"], "bf16_equivalent_bytes": stats["bf16_equivalent_bytes"],
            "native_equivalent_bytes": native,
            "ratio": stats["ratio"], "switches": stats["switches"], "demotions": stats["demotions"],
            "memory_budget": stats["memory_budget"], "timeline": bits_timeline(cache.history)}


def format_report(report: dict) -> str:
    timeline = ", ".join(f"steps {a}-{b}: {bits}-bit" for a, b, bits in report["timeline"])
    budget = report["memory_budget"]
    dtype = report.get("model_dtype", "model dtype")
    native = report.get("native_equivalent_bytes", report["bf16_equivalent_bytes"])
    saved = native - report["kv_bytes"]
    lines = [
        "",
        "--- hf-adaptive report ---",
        f"KV precision of new cold tokens: {timeline or 'n/a'}",
        f"KV bytes: {report['kv_bytes']:,} vs {native:,} uncompressed in {dtype} ({report['kv_bytes'] / max(native, 1):.2f}x, "
        f"{saved:,} bytes saved); {report['ratio']:.2f}x the bf16 equivalent" + (f"; budget {budget:,}" if budget else ""),
        f"switches: {report['switches']}, demoted blocks: {report['demotions'] or 'none'}",
        f"{report['new_tokens']} tokens in {report['seconds']:.2f} s = {report['tokens_per_s']:.1f} tokens/s "
        "(prefill included)",
    ]
    return "\n".join(lines)
