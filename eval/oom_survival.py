"""OOM survival: under a per-process GPU memory cap DynamicCache runs out of memory; AdaptiveKVCache demotes, finishes.

One command (CUDA, < 3 minutes on one H100):
    python eval/oom_survival.py --cap-gib 7 --out eval/results/kv_oom_survival_h100
Arithmetic only (any machine):
    python eval/oom_survival.py --arithmetic-only

Both caches get the same random-init Llama (MHA, so KV is large next to the weights), the same batch of random
prompts fed in chunks of ``--chunk`` tokens (chunked prefill) up to ``--context`` tokens, then ``--new-tokens``
greedy decode steps. ``torch.cuda.set_per_process_memory_fraction`` caps the process at ``--cap-gib``: chosen so
that weights + bf16 KV exceed the cap while weights + 4-bit KV fit well inside it (printed before running).
DynamicCache's ``torch.OutOfMemoryError`` is caught and recorded (tokens it held); AdaptiveKVCache runs in GPU
pressure mode (``gpu_memory_fraction``) with the fused attention, and its rung history is recorded.
Writes oom_survival.json / .md under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import time

from _common import environment  # first: sets the offline default
import torch
from tqdm import tqdm
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import hf_adaptive
from hf_adaptive.compat import forward_cache_kwargs
from hf_adaptive.evaluation.report import markdown_table, write_report
from hf_adaptive.kv.cache import AdaptiveKVCache
from hf_adaptive.kv.pressure import GPUMemoryPressure
from hf_adaptive.policy.kv_policy import KVPolicyConfig

GIB = 2**30
SHAPE = dict(hidden_size=1024, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
             intermediate_size=2048, vocab_size=32000)


def arithmetic(args) -> dict:
    """Bytes of weights, bf16 KV and 4-bit KV (codes + fp16 scales/zeros) at the full length, vs the cap."""
    c = SHAPE
    heads = c["num_attention_heads"] + c["num_key_value_heads"]
    layer = 2 * c["hidden_size"] * heads * c["head_dim"] + 3 * c["hidden_size"] * c["intermediate_size"]
    weights = 2 * (c["num_hidden_layers"] * layer + 2 * c["vocab_size"] * c["hidden_size"])
    tokens = args.context + args.new_tokens
    elems = args.batch * tokens * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"]  # per K or V
    kv_bf16 = 2 * elems * 2
    scales = elems / args.block_size + elems / min(args.value_group, c["head_dim"])  # k per block, v per group
    kv_4bit = int(2 * elems * 0.5 + 2 * 2 * scales)
    info = {"weights_gib": weights / GIB, "kv_bf16_gib": kv_bf16 / GIB, "kv_4bit_gib": kv_4bit / GIB,
            "cap_gib": args.cap_gib, "tokens_per_sequence": tokens, "batch": args.batch,
            "dynamic_needs_gib": (weights + kv_bf16) / GIB, "adaptive_floor_gib": (weights + kv_4bit) / GIB}
    # chunked prefill dequantizes one layer's history: ~3 float32 temporaries of K, then bf16 K, V, gathered, joined
    per_layer = elems / c["num_hidden_layers"]
    info["prefill_transient_gib"] = (per_layer * 4 * 3 + per_layer * 2 * 4) / GIB
    info["adaptive_peak_bound_gib"] = args.target_fraction * args.cap_gib + info["prefill_transient_gib"]
    info["dynamic_fits"] = info["dynamic_needs_gib"] < args.cap_gib
    info["adaptive_fits"] = (info["adaptive_floor_gib"] < args.target_fraction * args.cap_gib
                             and info["adaptive_peak_bound_gib"] < args.cap_gib)
    return info


def print_arithmetic(info: dict) -> None:
    print(f"weights {info['weights_gib']:.2f} GiB; KV at {info['tokens_per_sequence']} tokens x batch {info['batch']}: "
          f"bf16 {info['kv_bf16_gib']:.2f} GiB, 4-bit {info['kv_4bit_gib']:.2f} GiB; cap {info['cap_gib']:.2f} GiB")
    print(f"DynamicCache needs >= {info['dynamic_needs_gib']:.2f} GiB -> {'fits' if info['dynamic_fits'] else 'OOM'}; "
          f"AdaptiveKVCache at 4 bits >= {info['adaptive_floor_gib']:.2f} GiB -> "
          f"{'fits' if info['adaptive_fits'] else 'does NOT fit'} under target x cap; peak bound target x cap + "
          f"prefill transient {info['prefill_transient_gib']:.2f} = {info['adaptive_peak_bound_gib']:.2f} GiB")


@torch.no_grad()
def run(model, cache, args, desc: str) -> dict:
    """Chunked prefill to --context, then --new-tokens decode steps; OOM is caught and recorded."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, SHAPE["vocab_size"], (args.batch, args.context), generator=g)
    kwargs, held, t0 = forward_cache_kwargs(model, cache), 0, time.perf_counter()
    result = {"cache": desc, "completed": False, "oom": None}
    try:
        for start in tqdm(range(0, args.context, args.chunk), desc=f"{desc} prefill"):
            chunk = ids[:, start:start + args.chunk].to(args.device)
            out = model(input_ids=chunk, use_cache=True, logits_to_keep=1, **kwargs)
            held = start + chunk.shape[1]
        token = out.logits[:, -1:].argmax(-1)
        for _ in tqdm(range(args.new_tokens), desc=f"{desc} decode"):
            token = model(input_ids=token, use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1:].argmax(-1)
            held += 1
        torch.cuda.synchronize()
        result["completed"] = True
    except torch.OutOfMemoryError as err:
        result["oom"] = str(err).splitlines()[0][:200]
    result.update(tokens_held=held, new_tokens_generated=max(held - args.context, 0),
                  peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                  peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB, wall_s=time.perf_counter() - t0)
    return result


def rungs(cache: AdaptiveKVCache) -> list[dict]:
    """The steps where the rung changed (first step included), with the pressure that caused it."""
    keep = [h for i, h in enumerate(cache.history) if i == 0 or h["switched"]]
    return [{"step": h["step"], "stage": h["stage"], "bits": h["bits"],
             "pressure": round(h["pressure"]["fraction"], 3), "source": h["pressure"]["source"],
             "kv_gib": h.get("kv_bytes", 0) / GIB} for h in keep]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=32768, help="prompt tokens per sequence (chunked prefill)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens per forward)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--cap-gib", type=float, default=6.0, help="per-process memory cap (set via the fraction)")
    p.add_argument("--target-fraction", type=float, default=0.6, help="AdaptiveKVCache gpu_memory_fraction")
    p.add_argument("--demote-per-step", type=int, default=8, help="history blocks demoted per layer per step")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--value-group", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--arithmetic-only", action="store_true", help="print the memory arithmetic and exit")
    p.add_argument("--out", default="results/oom_survival")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    info = arithmetic(args)
    print_arithmetic(info)
    if args.arithmetic_only:
        return
    if not torch.cuda.is_available():
        raise SystemExit("oom_survival.py needs CUDA (device=cuda); got none. Fix: run on a GPU machine, or pass "
                         "--arithmetic-only.")
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = args.cap_gib * GIB / total
    torch.cuda.set_per_process_memory_fraction(fraction)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, max_position_embeddings=131072)).to(torch.bfloat16).eval()
    results = [run(model, DynamicCache(config=model.config), args, "DynamicCache")]
    gc.collect()
    torch.cuda.empty_cache()
    hf_adaptive.enable_fused_attention(model)
    # GPUMemoryPressure reads the cap from torch; where torch lacks that getter, hand it the fraction we set
    pressure = None if hasattr(torch.cuda, "get_per_process_memory_fraction") else \
        GPUMemoryPressure(args.target_fraction, process_fraction=fraction)
    cache = AdaptiveKVCache(model.config, gpu_memory_fraction=args.target_fraction, block_size=args.block_size,
                            value_group=args.value_group, pressure=pressure,
                            policy=KVPolicyConfig(demote_blocks_per_step=args.demote_per_step))
    results.append(run(model, cache, args, "AdaptiveKVCache"))
    stats = cache.stats()
    results[-1].update(kv_gib=stats["kv_bytes"] / GIB, ratio_vs_bf16=stats["ratio"], demotions=stats["demotions"])
    env = environment("cuda", per_process_memory_fraction=fraction,
                      cap_source="torch getter" if pressure is None else "explicit process_fraction")
    card = env["card"]
    columns = ["cache", "completed", "tokens_held", "new_tokens_generated", "peak_allocated_gib", "peak_reserved_gib",
               "kv_gib", "ratio_vs_bf16", "wall_s", "oom"]
    notes = "\n".join([f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in info.items()]
                      + ["", "Rung changes (AdaptiveKVCache):", "", markdown_table(rungs(cache))])
    paths = write_report(args.out, "oom_survival", {"arithmetic": info, "results": results, "rungs": rungs(cache),
                                                    "final_stats": {k: v for k, v in stats.items() if k != "layers"},
                                                    "args": vars(args)}, env, markdown_table(results, columns),
                         f"OOM survival under a {args.cap_gib} GiB cap on {card}", notes)
    print(markdown_table(results, columns))
    print("wrote", {k: str(v) for k, v in paths.items()})


if __name__ == "__main__":
    main()
