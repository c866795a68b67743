"""GPU benchmark of token-level precision switching: lossy and verified modes vs the native tier alone.

Every side runs the same decode path: ``GraphDecodeEngine`` with one CUDA graph per tier over one static
KV cache. Modes (decode tokens/s, prefill excluded; median of ``--repeats``):

- ``native``: native (bf16) tier every step - the baseline;
- ``int4``: int4 tinygemm every step (upper bound of the lossy speedup);
- ``lossy_high{H}``: tiers replayed from the confidences recorded from the real SmolLM2
  (eval/data/precision_schedule_smollm2.json): int4 where the score > H, native otherwise; H = 0.9 is
  the issue's default band, 0.75 a relaxed one (``--high``);
- ``controller_native``: a live ``PrecisionController`` whose policy always answers native: its time
  minus ``native`` is the controller overhead per step (confidence kernels + one host read);
  ``controller_native_lag1``: the same deciding from the step before (async copy, no host wait);
- ``verified`` (batch 1): real draft (int4) / verify (native) decode on these weights with the
  confidence-adaptive draft length, checked for token identity with ``native``;
  ``verified_always_draft``: the same with a draft every round (on random weights confidence is ~0,
  so only this one exercises accept / reject);
- ``verified_replay`` / ``verified_always_replay``: draft / verify rounds with the draft lengths and
  acceptance counts recorded from the real model (adaptive / always-draft): the speed a real model
  with that acceptance gets on this card, on these weights' shapes.

Weights: ``--model DIR`` (a local checkpoint, e.g. SmolLM2) or random-init Llama-3.2-1B shape.
Writes results.json, results.md and speed.png under ``--out``.

    python eval/bench_precision.py --out eval/results/precision_h100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_adaptive.policy.precision_policy import PrecisionPolicyConfig  # noqa: E402
from hf_adaptive.precision.controller import PrecisionController  # noqa: E402
from hf_adaptive.precision.decode import DecodeOptions, decode  # noqa: E402
from hf_adaptive.precision.graph_decode import GraphDecodeConfig, GraphDecodeEngine  # noqa: E402
from hf_adaptive.precision.tiers import prepare_tiers  # noqa: E402
from hf_adaptive.precision.verified import (  # noqa: E402
    VerifiedOptions, generate_verified, greedy_with_logits, mismatch_report)

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True)


def build_model(path: str | None, device: str):
    """A bf16 causal LM on ``device``: the checkpoint at ``path`` or random-init Llama-3.2-1B shape."""
    if path:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        return model.to(device).eval(), Path(path).name
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**LLAMA_1B)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval(), "random-init Llama-3.2-1B shape"


def load_schedule(path: str) -> tuple[list[float], dict[str, list[tuple[int, int]]]]:
    """Per-step confidences and, per verified variant, the rounds (k, accepted) of a recorded file."""
    rec = json.loads(Path(path).read_text())["records"]
    scores = [s for r in rec for s in r["lossy"]["scores"]]
    rounds = {key: [tuple(x) for r in rec for x in r[key]["rounds"]] for key in ("verified", "verified_always")}
    return scores, rounds


def tier_schedule(scores: list[float], high: float) -> tuple[str, ...]:
    """Recorded confidences -> tiers: int4 where score > high, else native (mid and top are both native)."""
    return tuple("int4" if s > high else "native" for s in scores)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after one warm-up (CUDA-synchronized)."""
    out = fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


@torch.no_grad()
def replay_verified(engine: GraphDecodeEngine, ids: torch.Tensor, rounds, n: int, max_draft: int) -> int:
    """Draft/verify rounds with recorded (k, accepted): the real kernels and syncs, recorded outcomes."""
    logits = engine.prefill(ids)
    last, produced, i = logits.argmax(-1), 1, 0
    while produced < n:
        k, acc = rounds[i % len(rounds)]
        start = engine.position
        tok = last
        for _ in range(k):
            tok = engine.forward(engine.tiers.fast, tok[:, None])[:, -1].argmax(-1)
        seq = torch.cat([last] * (max_draft + 1))[None]
        top = engine.forward(engine.tiers.top, seq, start)[0].argmax(-1)
        top[0].item()  # the per-round host read of the real loop
        engine.position = start + acc + 1
        last, produced, i = top[:1], produced + acc + 1, i + 1
    return produced


def verified_stats(out: torch.Tensor, ref: torch.Tensor, ref_logits: torch.Tensor,
                   history: list[tuple[int, int]]) -> dict:
    """Token identity with 1-token native greedy (1, n) (near-tie check at a mismatch, see
    ``mismatch_report``) and drafted / accepted tokens per round of the last run."""
    stats = mismatch_report(out, ref, ref_logits, torch.bfloat16)
    stats.update(accepted_per_round=statistics.mean(a for _, a in history) if history else 0,
                 drafted_per_round=statistics.mean(k for k, _ in history) if history else 0,
                 rounds_with_draft=sum(k > 0 for k, _ in history), rounds=len(history))
    return stats


@dataclass
class BatchRun:
    """One batch size's engine, prompt and results; ``run`` times a mode and stores its speed."""

    engine: GraphDecodeEngine
    ids: torch.Tensor  # (B, prompt_len)
    args: argparse.Namespace
    t_prefill: float = 0.0
    res: dict = field(default_factory=dict)

    def run(self, mode: str, fn) -> torch.Tensor:
        t, out = timed(fn, self.args.repeats)
        tokens = self.ids.shape[0] * (self.args.new_tokens - 1)
        self.res[mode] = {"seconds": t, "decode_tokens_per_s": tokens / max(t - self.t_prefill, 1e-9)}
        return out

    def decode(self, **kw) -> torch.Tensor:
        return decode(self.engine, self.ids, DecodeOptions(max_new_tokens=self.args.new_tokens, **kw))


def bench_verified(br: BatchRun, native: torch.Tensor, rounds: dict) -> None:
    """Batch-1 verified modes: adaptive / always-draft on these weights, and the recorded replays."""
    n, policy = br.args.new_tokens, PrecisionPolicyConfig(fast_tier="int4", mid_tier="native", top_tier="native")
    ref, ref_logits = greedy_with_logits(br.engine, br.ids, n)
    br.res["native"]["reproducible"] = bool(torch.equal(ref, native))
    for mode, adaptive in (("verified", True), ("verified_always_draft", False)):
        opts = VerifiedOptions(max_new_tokens=n, max_draft=br.args.max_draft, policy=policy, adaptive_draft=adaptive)

        def run(opts=opts):
            opts.history.clear()  # keep the last run's rounds only
            return generate_verified(br.engine, br.ids, opts)

        out = br.run(mode, run)
        br.res[mode].update(verified_stats(out, ref, ref_logits, opts.history))
    del ref_logits
    for key, recorded in rounds.items():
        br.run(f"{key}_replay", lambda: replay_verified(br.engine, br.ids, recorded, n, br.args.max_draft))


def bench_batch(tiers, batch: int, args, schedule, rounds) -> dict:
    """All modes at one batch size; returns {mode: {...}}."""
    n, plen = args.new_tokens, args.prompt_len
    ids = torch.randint(1, tiers.model.config.vocab_size, (batch, plen),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    verify = args.max_draft + 1 if batch == 1 else 0
    engine = GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=batch, max_len=plen + n + verify + 8,
                                                        verify_len=verify))
    br = BatchRun(engine, ids, args)
    br.t_prefill, _ = timed(lambda: decode(engine, ids, DecodeOptions(max_new_tokens=1)), args.repeats)
    native = br.run("native", lambda: br.decode(tier="native"))
    br.run("int4", lambda: br.decode(tier="int4"))
    for high in args.high:  # lossy: tiers replayed from the real model's confidences, per threshold
        br.run(f"lossy_high{high}", lambda: br.decode(schedule=tier_schedule(schedule, high)))
    always_native = PrecisionPolicyConfig(fast_tier="native", mid_tier="native", top_tier="native")
    ctl = PrecisionController(tiers, always_native, read_raw_logits=False)
    br.run("controller_native", lambda: br.decode(controller=ctl))
    br.run("controller_native_lag1", lambda: br.decode(controller=ctl, decision_lag=1))
    ctl.close()
    if batch == 1:
        bench_verified(br, native, rounds)
    res = br.res
    for mode in list(res):
        res[mode]["speedup_vs_native"] = res[mode]["decode_tokens_per_s"] / res["native"]["decode_tokens_per_s"]
    for key, mode in (("controller_overhead_fraction", "controller_native"),
                      ("controller_lag1_overhead_fraction", "controller_native_lag1")):
        res[key] = res[mode]["seconds"] / res["native"]["seconds"] - 1
    return res


def write_outputs(out_dir: Path, result: dict) -> None:
    """results.json, results.md (one table per batch size) and speed.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Precision switching benchmark ({result['card']})", "",
             f"torch {result['torch']}, transformers {result['transformers']}, weights: {result['weights']}",
             f"command: `{result['command']}`", "",
             f"tier weight bytes: {result['tier_weight_bytes']}",
             f"int4 fraction of the replayed schedule per threshold: {result['schedule_fast_fraction']}", ""]
    for batch, res in result["batches"].items():
        lines += [f"## batch {batch}", "", "| mode | decode tok/s | × native |", "|---|---|---|"]
        for mode, r in res.items():
            if isinstance(r, dict):
                lines.append(f"| {mode} | {r['decode_tokens_per_s']:.1f} | {r['speedup_vs_native']:.2f} |")
        lines += ["", f"controller overhead: {100 * res['controller_overhead_fraction']:.2f} % (decision for "
                  f"the next step), {100 * res['controller_lag1_overhead_fraction']:.2f} % (decision lag 1)"]
        for mode in ("verified", "verified_always_draft"):
            if mode in res:
                v = res[mode]
                tie = "" if v["token_identical"] else (
                    f", greedy top-2 gap there {v['greedy_gap_at_mismatch']:.4g} vs bf16 rounding step "
                    f"{v['rounding_step']:.4g}: near-tie {v['near_tie']}")
                lines.append(f"{mode}: token-identical to native greedy: {v['token_identical']} (first mismatch: "
                             f"{v['first_mismatch']}{tie}; rounds with a draft {v['rounds_with_draft']}/{v['rounds']}, "
                             f"drafted/round {v['drafted_per_round']:.2f}, "
                             f"accepted/round {v['accepted_per_round']:.2f})")
        lines.append("")
    (out_dir / "results.md").write_text("\n".join(lines))
    plot_speed(out_dir / "speed.png", result)


def plot_speed(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(result["batches"])
    fig, axes = plt.subplots(1, len(batches), figsize=(7 * len(batches), 4.6), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        res = {m: r for m, r in result["batches"][batch].items() if isinstance(r, dict)}
        ax.bar(list(res), [r["speedup_vs_native"] for r in res.values()], color="tab:blue")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"batch {batch}: decode speed vs native")
        ax.set_xticks(range(len(res)), list(res), rotation=35, ha="right", fontsize=8)
    fig.suptitle(f"{result['card']} - {result['weights']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="local checkpoint dir; default random-init Llama-3.2-1B")
    ap.add_argument("--schedule", default=str(Path(__file__).parent / "data/precision_schedule_smollm2.json"))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-draft", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--high", type=float, nargs="+", default=[0.9, 0.75],
                    help="fast-tier thresholds for the lossy replay (0.9 = issue default)")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only smoke-tests the script")
    ap.add_argument("--smoke-shape", action="store_true", help="tiny random shape (for --device cpu)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_precision.py needs a CUDA GPU (the speedup only shows under CUDA graphs)")
    if args.smoke_shape:
        LLAMA_1B.update(hidden_size=256, num_hidden_layers=2, intermediate_size=512, vocab_size=512,
                        num_attention_heads=4, num_key_value_heads=2)
    model, weights = build_model(args.model, args.device)
    tiers = prepare_tiers(model, tiers=("int4", "native"))
    schedule, rounds = load_schedule(args.schedule)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke test, not a benchmark)"
    result = {"card": card, "torch": torch.__version__,
              "transformers": transformers.__version__, "weights": weights, "command": " ".join(sys.argv),
              "tier_weight_bytes": tiers.memory_bytes(), "int4_unsupported_linears": tiers.unsupported,
              "schedule_fast_fraction": {str(h): tier_schedule(schedule, h).count("int4") / len(schedule)
                                         for h in args.high}, "batches": {}}
    for batch in tqdm(args.batch_sizes, desc="batch sizes"):
        result["batches"][str(batch)] = bench_batch(tiers, batch, args, schedule, rounds)
    result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    write_outputs(Path(args.out), result)
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
