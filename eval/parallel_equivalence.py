"""Every parallel plan vs one device for the same model: greedy tokens (fp32) and logits (bf16).

Run one process per device, e.g. on 2 or 4 GPUs:
    python -m hf_adaptive.parallel.run_script --processes 2 eval/parallel_equivalence.py --model PATH \
        --out runs/equiv_2gpu
(CPU check: python -m hf_adaptive.parallel.run_script --processes 2 --cpu eval/parallel_equivalence.py \
    ... --dtypes float32.)

For each dtype the reference is ``model.generate`` (greedy) and one teacher-forced forward of the full
model on rank 0's device. For each valid plan (TP, PP, DP, TP x PP) it reports: greedy tokens identical
(required in fp32), max |logit diff| over prompt+continuation positions, and top-1 agreement
(bf16: against ``--bf16-tolerance``, and against the fp32 logits next to what bf16 costs on one device). Writes ``equivalence.json`` and ``equivalence.md``;
exit status 1 if fp32 tokens differ for any plan.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from _common import environment  # first: sets the offline default
import torch
import torch.distributed as dist

from hf_adaptive.evaluation.report import device_description
from hf_adaptive.parallel.engine import Engine
from hf_adaptive.parallel.plans import ModelDims, all_plans
from hf_adaptive.parallel.worker import init_distributed, load_host_model

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that reverses a linked list.",
    "List three prime numbers larger than 100.",
    "Translate to French: The weather is nice today and we are going to the park.",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--bf16-tolerance", type=float, default=0.5, help="max |logit diff| accepted in bf16")
    p.add_argument("--out", required=True)
    return p.parse_args()


def batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts through the chat template, left-padded: ``(B, T)`` ids and mask."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def reference(model, ids, mask, new_tokens: int, device, teacher: torch.Tensor | None):
    """Single-device greedy tokens ``(B, G)`` and logits ``(B, T+G, V)`` teacher-forced on ``teacher``
    (``(B, T+G)`` ids; default: this reference's own continuation). Returns (tokens, (full, mask, logits))."""
    ref = copy.deepcopy(model).to(device)
    # Plain argmax for exactly new_tokens steps, as the engine decodes: no EOS stop and no EOS suppression
    # (min_new_tokens would mask EOS and pick the runner-up where the engine, rightly, picks EOS).
    ref.generation_config.eos_token_id = None
    out = ref.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0).cpu()
    full = out if teacher is None else teacher
    full_mask = torch.cat([mask, torch.ones_like(full[:, ids.shape[1]:])], dim=1)
    positions = (full_mask.long().cumsum(-1) - 1).clamp_min(0)  # as generate does for left padding
    with torch.inference_mode():
        logits = ref(input_ids=full.to(device), attention_mask=full_mask.to(device),
                     position_ids=positions.to(device)).logits.float().cpu()
    del ref
    return out[:, ids.shape[1]:], (full, full_mask, logits)


def logit_stats(logits: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor) -> dict:
    """Max / mean over valid positions of the per-position max |diff|, and top-1 agreement."""
    diff = (logits - ref).abs().amax(dim=-1)[valid]
    top1 = (logits.argmax(-1) == ref.argmax(-1))[valid].float().mean().item()
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(), "top1_agreement": top1}


def compare_plan(engine: Engine, ids, mask, ref_tokens, ref_full, new_tokens: int,
                 fp32_logits: torch.Tensor | None) -> dict:
    full, full_mask, ref_logits = ref_full
    tokens = engine.generate(ids, mask, new_tokens)
    logits = engine.forward_logits(full, full_mask)
    stats = None
    if logits is not None and engine.shard.tp_rank == 0 and engine.shard.dp_index == 0:
        logits, valid = logits.float().cpu(), full_mask.bool()
        stats = {"tokens_identical": bool(torch.equal(tokens, ref_tokens)),
                 "first_token_mismatch": _first_mismatch(tokens, ref_tokens), **logit_stats(logits, ref_logits, valid)}
        if fp32_logits is not None:  # the error a plan adds, next to what bf16 itself costs on one device
            stats["vs_fp32"] = logit_stats(logits, fp32_logits, valid)
            stats["one_device_bf16_vs_fp32"] = logit_stats(ref_logits, fp32_logits, valid)
    gathered = [None] * engine.world_size
    dist.all_gather_object(gathered, stats)
    return next(s for s in gathered if s is not None)


def _first_mismatch(a: torch.Tensor, b: torch.Tensor) -> int | None:
    neq = (a != b).any(dim=0).nonzero()
    return int(neq[0]) if len(neq) else None


def bf16_ok(r: dict, tolerance: float) -> bool:
    """Within the stated tolerance of the bf16 one-device logits, or no further from fp32 than bf16 itself is."""
    if r["max_abs_logit_diff"] <= tolerance:
        return True
    if "vs_fp32" not in r:
        return False
    own, base = r["vs_fp32"], r["one_device_bf16_vs_fp32"]
    return (own["mean_abs_logit_diff"] <= 1.25 * base["mean_abs_logit_diff"] + 0.05
            and own["top1_agreement"] >= base["top1_agreement"] - 0.02)


def main() -> int:
    args = parse_args()
    rank, world, device = init_distributed()
    report = {"meta": {**environment(str(device)), "world_size": world, "model": args.model,
                       "device": device_description(device), "bf16_tolerance": args.bf16_tolerance}, "results": {}}
    teacher, fp32_logits = None, None
    for dtype in sorted(args.dtypes, key=lambda d: d != "float32"):  # fp32 first: it anchors the others
        model, tokenizer = load_host_model(args.model, dtype)
        ids, mask = batch(tokenizer)
        ref_tokens, ref_full = reference(model, ids, mask, args.new_tokens, device, teacher)
        if dtype == "float32":
            teacher, fp32_logits = ref_full[0], ref_full[2]
        plans = all_plans(world, ModelDims.from_config(model.config))
        engine = Engine(model, rank, world, device, plans)
        for plan in plans:
            engine.reshard(plan)
            key = f"{dtype}/{plan.name}"
            report["results"][key] = compare_plan(engine, ids, mask, ref_tokens, ref_full, args.new_tokens,
                                                  None if dtype == "float32" else fp32_logits)
            if rank == 0:
                print(key, report["results"][key], flush=True)
        del engine, model
    ok = all(r["tokens_identical"] for k, r in report["results"].items() if k.startswith("float32/"))
    report["fp32_tokens_identical_all_plans"] = ok
    report["bf16_ok"] = {k: bf16_ok(r, args.bf16_tolerance)
                         for k, r in report["results"].items() if not k.startswith("float32/")}
    if rank == 0:
        write(report, Path(args.out))
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "equivalence.json").write_text(json.dumps(report, indent=1))
    m = report["meta"]
    lines = [f"# Parallel plans vs one device ({m['device']} x {m['world_size']})", "",
             f"torch {m['torch']}, transformers {m['transformers']}, model `{m['model']}`", "",
             f"Command: `{m['command']}`", "",
             "Logit columns: per-position max |diff| over the vocabulary, vs the one-device run of the same dtype; "
             "'vs fp32' columns compare with one-device fp32 (in brackets: one-device bf16 vs fp32).", "",
             "| dtype/plan | greedy tokens identical | first mismatch | max abs diff | mean | top-1 agree | "
             "vs fp32: mean | vs fp32: top-1 |", "|---|---|---|---|---|---|---|---|"]
    for k, r in report["results"].items():
        f32, base = r.get("vs_fp32"), r.get("one_device_bf16_vs_fp32")
        extra = (f"{f32['mean_abs_logit_diff']:.3g} ({base['mean_abs_logit_diff']:.3g}) | "
                 f"{f32['top1_agreement']:.4f} ({base['top1_agreement']:.4f})") if f32 else "- | -"
        lines.append(f"| {k} | {r['tokens_identical']} | {r['first_token_mismatch']} | "
                     f"{r['max_abs_logit_diff']:.4g} | {r['mean_abs_logit_diff']:.3g} | {r['top1_agreement']:.4f} | "
                     f"{extra} |")
    lines += ["", f"fp32 tokens identical on all plans: **{report['fp32_tokens_identical_all_plans']}**",
              f"bf16 accepted (max |diff| <= {m['bf16_tolerance']} vs one-device bf16, or no further from fp32 "
              f"than one-device bf16: mean within 1.25x + 0.05, top-1 within 2 points): {report['bf16_ok']}"]
    (out / "equivalence.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
