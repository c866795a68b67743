"""GPU diagnosis of graph-decode mismatches against eager decode: a real bug or bf16 near-ties?

Part A (the bug): the CUDA-graph capture warm-up really executes; it used to run at position 0 and wrote
dummy-token KV over the first ``q`` prompt entries. For a random bf16 tiny Llama this measures, with the
warm-up at position 0 (old code, reproduced by pinning the warm-up position) and at the first free
position (fixed code): how much the prompt KV changed during capture and the first token where graph
decode differs from eager decode.

Part B (rounding): verified mode (int4 drafts, 5-token verify graph) against 1-token top-tier greedy on
several prompts, in fp32 (TF32 off) and bf16. For each: the first mismatch, greedy's top-2 logit gap
there, the dtype's rounding step at the top logit, and the median top-2 gap over all positions.

Part C (reproducibility): on the benchmark's random 1B-shape weights, 1-token bf16 greedy run three
times on one engine (graphs, then eager), and once after filling the unwritten KV slots with large
values: identical runs mean the reference is deterministic, an after-poison change means masked slots leak.

    python eval/diag_precision_graph.py --out results/precision_diag
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _common import environment  # first: sets the offline default
import torch
import transformers
from tqdm import tqdm

from hf_adaptive.policy.precision_policy import PrecisionPolicyConfig
from hf_adaptive.precision.controller import PrecisionController
from hf_adaptive.precision.decode import decode
from hf_adaptive.precision.graph_decode import GraphDecodeConfig, GraphDecodeEngine
from hf_adaptive.precision.options import DecodeOptions, DraftOptions
from hf_adaptive.precision.tiers import prepare_tiers
from hf_adaptive.precision.verified import generate_verified, greedy_with_logits, mismatch_report


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


def part_b_case(dtype: torch.dtype, top: str, seed: int, n: int) -> dict:
    tiers = prepare_tiers(tiny_llama(dtype), ("int4", top))
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(1, 512, (1, 12), device="cuda", generator=gen)
    engine = GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=1, max_len=128, verify_len=5))
    ref, logits = greedy_with_logits(engine, ids, n)
    draft = DraftOptions(max_draft=4, adaptive=False,
                         policy=PrecisionPolicyConfig(fast_tier="int4", mid_tier=top, top_tier=top))
    opts = DecodeOptions(max_new_tokens=n, draft=draft)
    out = generate_verified(engine, ids, opts)
    top2 = logits[0].topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1]).tolist()
    row = {"seed": seed, "median_top2_gap": statistics.median(gaps),
           "accepted_per_round": statistics.mean(a for _, a in draft.history)}
    row.update(mismatch_report(out, ref, logits, dtype))
    return row


def llama_1b_shape():
    """The benchmark's default weights: random-init bf16 Llama-3.2-1B shape (near-uniform logits)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                   max_position_embeddings=4096, tie_word_embeddings=True)
    with torch.device("cuda"):
        return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def _disturb(engine: GraphDecodeEngine, ids: torch.Tensor, n: int, what: str) -> None:
    """What the benchmark runs between its native run and its verified runs, one kind at a time."""
    if what == "int4_decode":
        decode(engine, ids, DecodeOptions(max_new_tokens=n, tier="int4"))
    elif what == "mixed_schedule_decode":
        decode(engine, ids, DecodeOptions(max_new_tokens=n, schedule=("int4", "native", "native")))
    elif what == "controller_decode":
        native = PrecisionPolicyConfig(fast_tier="native", mid_tier="native", top_tier="native")
        ctl = PrecisionController(engine.tiers, native, read_raw_logits=False)
        decode(engine, ids, DecodeOptions(max_new_tokens=n, controller=ctl, decision_lag=1))
        ctl.close()
    elif what == "poison_unwritten_kv":  # the mask must hide every slot not yet written in this run
        for layer in engine.cache.layers:
            layer.keys[:, :, ids.shape[1]:].fill_(30.0)
            layer.values[:, :, ids.shape[1]:].fill_(-30.0)


def part_c(n: int) -> dict:
    """Is 1-token greedy reproducible on the benchmark's engine (1B shape, prompt 64, max_len 333)?
    Greedy is re-run after each kind of run the benchmark interleaves; eager once for comparison."""
    tiers = prepare_tiers(llama_1b_shape(), ("int4", "native"))
    ids = torch.randint(1, 128256, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
    engine = GraphDecodeEngine(tiers, GraphDecodeConfig(1, 64 + n + 13, 5))
    runs = {"graph_run0": greedy_with_logits(engine, ids, n), "graph_run1": greedy_with_logits(engine, ids, n),
            "decode_native": (decode(engine, ids, DecodeOptions(max_new_tokens=n, tier="native")), None)}
    for what in ("int4_decode", "mixed_schedule_decode", "controller_decode", "poison_unwritten_kv"):
        _disturb(engine, ids, n, what)
        runs[f"greedy_after_{what}"] = greedy_with_logits(engine, ids, n)
    eager = GraphDecodeEngine(tiers, GraphDecodeConfig(1, 64 + n + 13, 5, use_cuda_graphs=False))
    runs["eager"] = greedy_with_logits(eager, ids, n)
    base_tok, base_logits = runs["graph_run0"]
    return {name: {"first_token_mismatch_vs_graph_run0": first_mismatch(tok, base_tok),
                   "max_abs_logit_diff_vs_graph_run0": float((lg - base_logits).abs().max()) if lg is not None
                   else float("nan")}
            for name, (tok, lg) in runs.items()}


def _reset_unwritten(engine: GraphDecodeEngine, start: int, value: float) -> None:
    for layer in engine.cache.layers:
        layer.keys[:, :, start:].fill_(value)
        layer.values[:, :, start:].fill_(-value)


def part_d(n: int) -> dict:
    """Does 1-token greedy depend on the content of masked (unwritten) KV slots, and on cuDNN attention?
    Per attention setting (the engine's default, which excludes cuDNN SDPA; unrestricted; cuDNN off):
    greedy after zeroing the unwritten slots (twice), after filling them with 30/-30, and twice back to
    back; every run compared with the first zeroed run."""
    res = {}
    ids = torch.randint(1, 128256, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
    for name, cudnn, restrict in (("engine_default(deterministic_attention=True)", True, True),
                                  ("unrestricted_cudnn_sdp_on", True, False),
                                  ("unrestricted_cudnn_sdp_off_globally", False, False)):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        tiers = prepare_tiers(llama_1b_shape(), ("int4", "native"))
        engine = GraphDecodeEngine(tiers, GraphDecodeConfig(1, 64 + n + 13, 5, deterministic_attention=restrict))
        greedy_with_logits(engine, ids, 1)  # capture
        runs = []
        for fill in (0.0, 0.0, 30.0, None, None):
            if fill is not None:
                _reset_unwritten(engine, 64, fill)
            runs.append(greedy_with_logits(engine, ids, n)[0])
        names = ("zeroed_again", "poisoned_30", "back_to_back_1", "back_to_back_2")
        res[name] = {k: first_mismatch(t, runs[0]) for k, t in zip(names, runs[1:])}
        del engine, tiers
        torch.cuda.empty_cache()
    torch.backends.cuda.enable_cudnn_sdp(True)
    return res


def write(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "diag.json").write_text(json.dumps(result, indent=2))
    lines = [f"# precision graph diagnosis ({result['env']['card']})", "", f"`{result['env']['command']}`", "",
             f"torch {result['env']['torch']}, transformers {result['env']['transformers']}", "",
             "## A: graph vs eager (batch 2, verify_len 5)", "",
             "| case | prompt KV max change | first token graph != eager |",
             "|---|---|---|"]
    lines += [f"| {k} | {v['prompt_kv_max_abs_change']:.4g} | {v['first_token_graph_ne_eager']} |"
              for k, v in result["part_a"].items()]
    lines += ["", "## B: verified vs 1-token greedy", "", "| dtype | seed | first mismatch | gap there | rounding step "
              "| median top-2 gap | accepted/round |", "|---|---|---|---|---|---|---|"]
    for dt, rows in result["part_b"].items():
        lines += [f"| {dt} | {r['seed']} | {r['first_mismatch']} | {r.get('greedy_gap_at_mismatch', '')} | "
                  f"{r.get('rounding_step', '')} | {r['median_top2_gap']:.3g} | {r['accepted_per_round']:.2f} |"
                  for r in rows]
    if "part_c" in result:
        lines += ["", "## C: is 1-token bf16 greedy reproducible on the benchmark engine? (1B shape, prompt 64)", "",
                  "| run | first token != graph_run0 | max abs logit diff |", "|---|---|---|"]
        lines += [f"| {k} | {v['first_token_mismatch_vs_graph_run0']} | {v['max_abs_logit_diff_vs_graph_run0']:.4g} |"
                  for k, v in result["part_c"].items()]
    if "part_d" in result:
        lines += ["", "## D: first token differing from greedy after zeroing the unwritten KV slots", "",
                  f"`{json.dumps(result['part_d'])}`"]
    (out_dir / "diag.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repro-tokens", type=int, default=256, help="part C length (0 skips part C)")
    args = ap.parse_args()
    torch.manual_seed(0)
    tiers = prepare_tiers(tiny_llama(torch.bfloat16), ("int4", "native"))
    result = {"env": environment("cuda"),
              "part_a": part_a(tiers, torch.randint(1, 512, (2, 12), device="cuda")), "part_b": {}}
    for dtype, top in ((torch.float32, "fp32"), (torch.bfloat16, "native")):
        result["part_b"][str(dtype)] = [part_b_case(dtype, top, s, args.new_tokens)
                                        for s in tqdm(range(args.seeds), desc=str(dtype))]
    if args.repro_tokens:
        result["part_c"] = part_c(args.repro_tokens)
        result["part_d"] = part_d(args.repro_tokens)
    write(Path(args.out), result)
    print((Path(args.out) / "diag.md").read_text())


if __name__ == "__main__":
    main()
