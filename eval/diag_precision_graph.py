"""GPU diagnosis of the issue-7 graph-decode failures: real bug or bf16 near-ties?

Part A (the bug): the CUDA-graph capture warm-up really executes; it used to run at position 0 and wrote
dummy-token KV over the first ``q`` prompt entries. For a random bf16 tiny Llama this measures, with the
warm-up at position 0 (old code, reproduced by pinning the warm-up position) and at the first free
position (fixed code): how much the prompt KV changed during capture and the first token where graph
decode differs from eager decode.

Part B (rounding): verified mode (int4 drafts, 5-token verify graph) against 1-token top-tier greedy on
several prompts, in fp32 (TF32 off) and bf16. For each: the first mismatch, greedy's top-2 logit gap
there, the bf16 step of the top logit, and the median top-2 gap over all positions.

    python eval/diag_precision_graph.py --out eval/results/precision_diag_h100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_adaptive.policy.precision_policy import PrecisionPolicyConfig  # noqa: E402
from hf_adaptive.precision.decode import DecodeOptions, decode  # noqa: E402
from hf_adaptive.precision.graph_decode import GraphDecodeConfig, GraphDecodeEngine  # noqa: E402
from hf_adaptive.precision.tiers import prepare_tiers  # noqa: E402
from hf_adaptive.precision.verified import VerifiedOptions, generate_verified  # noqa: E402


def tiny_llama(dtype: torch.dtype):
    """The GPU test's model: random 2-layer Llama, hidden 256, lm_head x30 (confident logits)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model.to(dtype)


class OldWarmUpEngine(GraphDecodeEngine):
    """The pre-fix behaviour: capture warm-ups run at position 0, over the prompt."""

    def _warm_up(self, q: int) -> None:
        saved, self.position = self.position, 0
        super()._warm_up(q)
        self.position = saved


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> int | None:
    same = (a == b).all(dim=0)
    return None if bool(same.all()) else int((~same).nonzero()[0])


def part_a(tiers, ids: torch.Tensor) -> dict:
    """Graph vs eager decode per tier, with the old and the fixed warm-up position."""
    res = {}
    for tier in tiers.ladder:
        eager = decode(GraphDecodeEngine(tiers, GraphDecodeConfig(2, 96, 5, use_cuda_graphs=False)), ids,
                       DecodeOptions(max_new_tokens=32, tier=tier))
        for name, cls in (("old_warmup_pos0", OldWarmUpEngine), ("fixed_warmup_free_pos", GraphDecodeEngine)):
            engine = cls(tiers, GraphDecodeConfig(2, 96, 5, use_cuda_graphs=True))
            graph = decode(engine, ids, DecodeOptions(max_new_tokens=32, tier=tier))
            t = ids.shape[1]
            after = [layer.keys[:, :, :t].float().clone() for layer in engine.cache.layers]
            engine.prefill(ids)  # graphs exist: this rewrites the true prompt KV
            delta = max(float((a - layer.keys[:, :, :t].float()).abs().max())
                        for a, layer in zip(after, engine.cache.layers))
            res[f"{tier}/{name}"] = {"prompt_kv_max_abs_change": delta,
                                     "first_token_graph_ne_eager": first_mismatch(graph, eager)}
    return res


def greedy_with_logits(engine: GraphDecodeEngine, ids: torch.Tensor, n: int):
    logits, toks, seen = engine.prefill(ids), [], []
    for i in range(n):
        seen.append(logits[0].float().clone())
        toks.append(logits.argmax(-1))
        if i < n - 1:
            logits = engine.forward(engine.tiers.top, toks[-1][:, None])[:, -1]
    return torch.stack(toks, 1), torch.stack(seen)


def part_b_case(dtype: torch.dtype, top: str, seed: int, n: int) -> dict:
    tiers = prepare_tiers(tiny_llama(dtype), ("int4", top))
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(1, 512, (1, 12), device="cuda", generator=gen)
    engine = GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=1, max_len=128, verify_len=5))
    ref, logits = greedy_with_logits(engine, ids, n)
    opts = VerifiedOptions(max_new_tokens=n, max_draft=4, adaptive_draft=False,
                           policy=PrecisionPolicyConfig(fast_tier="int4", mid_tier=top, top_tier=top))
    out = generate_verified(engine, ids, opts)
    top2 = logits.topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1]).tolist()
    i = first_mismatch(out, ref)
    row = {"seed": seed, "first_mismatch": i, "median_top2_gap": statistics.median(gaps),
           "accepted_per_round": statistics.mean(a for _, a in opts.history)}
    if i is not None:
        r = logits[i]
        row["gap_at_mismatch"] = float(r[ref[0, i]] - r[out[0, i]])
        row["bf16_step_of_top_logit"] = 2.0 ** (torch.floor(torch.log2(r.abs().max())).item() - 7)
    return row


def write(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "diag.json").write_text(json.dumps(result, indent=2))
    lines = [f"# precision graph diagnosis ({result['env']['card']})", "", f"`{result['env']['command']}`", "",
             f"torch {result['env']['torch']}, transformers {result['env']['transformers']}", "",
             "## A: graph vs eager (batch 2, verify_len 5)", "", "| case | prompt KV max change | first token graph != eager |",
             "|---|---|---|"]
    lines += [f"| {k} | {v['prompt_kv_max_abs_change']:.4g} | {v['first_token_graph_ne_eager']} |"
              for k, v in result["part_a"].items()]
    lines += ["", "## B: verified vs 1-token greedy", "", "| dtype | seed | first mismatch | gap there | bf16 step "
              "| median top-2 gap | accepted/round |", "|---|---|---|---|---|---|---|"]
    for dt, rows in result["part_b"].items():
        lines += [f"| {dt} | {r['seed']} | {r['first_mismatch']} | {r.get('gap_at_mismatch', '')} | "
                  f"{r.get('bf16_step_of_top_logit', '')} | {r['median_top2_gap']:.3g} | {r['accepted_per_round']:.2f} |"
                  for r in rows]
    (out_dir / "diag.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    torch.manual_seed(0)
    tiers = prepare_tiers(tiny_llama(torch.bfloat16), ("int4", "native"))
    result = {"env": {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "transformers": transformers.__version__, "command": " ".join(sys.argv)},
              "part_a": part_a(tiers, torch.randint(1, 512, (2, 12), device="cuda")), "part_b": {}}
    for dtype, top in ((torch.float32, "fp32"), (torch.bfloat16, "native")):
        result["part_b"][str(dtype)] = [part_b_case(dtype, top, s, args.new_tokens)
                                        for s in tqdm(range(args.seeds), desc=str(dtype))]
    write(Path(args.out), result)
    print((Path(args.out) / "diag.md").read_text())


if __name__ == "__main__":
    main()
