"""GPU benchmark of token-level precision switching: lossy and verified modes vs the native tier alone.

Every lossy / fixed-tier side runs the same decode path: ``FusedStepDecoder``, one CUDA graph per tier
over one static KV cache, the greedy token picked inside the graph (no per-step host work but one
replay). Tiers: every decoder linear plus lm_head, q/k/v and gate/up fused into one matmul per tier
(native and int4 alike). Modes (decode tokens/s, prefill excluded; median of ``--repeats``):

- ``native`` / ``int4``: one tier every step (int4 is the upper bound of the lossy speedup);
- ``lossy_{tag}_high{H}``: tiers replayed from the confidences recorded from a real model (``--schedule``,
  tag ``chat``: SmolLM2 on four chat prompts; ``translate``: SmolLM2 translating the Spanish dev set):
  int4 where the score > H, native otherwise, WITH the in-graph decision computed and read (lag 1),
  i.e. the real cost of the lossy mode on this card with that model's tier mix;
- ``controller_native`` / ``controller_native_lag1``: the in-graph decision (confidence, band, tier
  index, pinned async copy) with a policy that always answers native, read at lag 0 (one event wait
  per step) / lag 1 (no wait): minus ``native`` = the controller overhead;
- ``eager_controller_native``: the previous path for comparison: one-token graphs, eager confidence
  ops and a ``.tolist()`` per step (``decode`` + ``PrecisionController``);
- ``prev_prep_native`` / ``prev_prep_int4`` (batch 1): tiers prepared as before this change (decoder
  linears only, no fusion), same fused decode path: the effect of lm_head tiering + fusion;
- ``verified`` / ``verified_always_draft`` (batch 1): real int4-draft / native-verify decode on these
  weights, checked for token identity with native greedy; ``*_replay``: recorded draft lengths and
  acceptance replayed on these shapes; plus a cost model from the measured step times;
- ``compiled_*`` (``--compile``, ``--compile-batch-sizes``, run last): the same fused steps under
  ``torch.compile`` (inductor, then CUDA graph), and at batch 1 verified mode on an engine whose draft /
  verify graphs are compiled too (``GraphDecodeConfig(compile=True)``), with its own cost model.
  ``--compile-only`` skips the uncompiled sections.

Weights: ``--model DIR`` (a local checkpoint), ``--config-dir DIR`` (that architecture with seeded random
weights, e.g. a config-only export of Qwen2.5-Coder-1.5B) or a random-init Llama of ``--shape`` (default
Llama-3.2-1B; ``llama-3.1-8b`` is where weights dominate the step). Writes results.json,
results.md and speed.png under ``--out`` (rewritten after each section, so a cut-off run keeps its data).

    python eval/bench_precision.py --out results/precision --compile
    python eval/bench_precision.py --config-dir .gpu/qwen_cfg --compile-only --compile-batch-sizes 1 8 \
        --schedule eval/data/precision_schedule_qwen2.5-coder-1.5b_translate.json --out /tmp/precision_qwen
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import environment  # first: sets the offline default
from _precision_report import verified_cost_model, write_outputs
import torch
import transformers
from tqdm import tqdm

from hf_adaptive.policy.precision_policy import PrecisionPolicyConfig
from hf_adaptive.precision.controller import PrecisionController
from hf_adaptive.precision.decode import decode
from hf_adaptive.precision.fused_decode import FusedStepDecoder, decision_for
from hf_adaptive.precision.graph_decode import GraphDecodeConfig, GraphDecodeEngine
from hf_adaptive.precision.options import DecodeOptions, DraftOptions
from hf_adaptive.precision.tiers import prepare_tiers
from hf_adaptive.precision.verified import generate_verified, greedy_with_logits, mismatch_report

SHAPES = {  # random-init Llama shapes (no weights needed): step times depend on shapes, not values
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, max_position_embeddings=4096,
                         tie_word_embeddings=True),
    # weights dominate the step here (16 GB bf16): where int4's 2.4x per matmul should show end to end
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, max_position_embeddings=4096,
                         tie_word_embeddings=False),
    "smoke": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=512, vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=True),
}
ALWAYS_NATIVE = PrecisionPolicyConfig(fast_tier="native", mid_tier="native", top_tier="native")
LOSSY = PrecisionPolicyConfig(fast_tier="int4", mid_tier="native", top_tier="native")


def build_model(path: str | None, device: str, config_dir: str | None = None, shape: str = "llama-3.2-1b"):
    """A bf16 causal LM on ``device``: the checkpoint at ``path``, ``config_dir``'s architecture with seeded
    random weights, or a random-init Llama of ``shape`` (a key of ``SHAPES``)."""
    if config_dir:
        from hf_adaptive.evaluation.random_model import load_random_model

        model, _ = load_random_model(config_dir, device, "bfloat16", seed=0)
        return model.eval(), f"random-init {model.config.model_type} shape from {Path(config_dir).name}"
    if path:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        return model.to(device).eval(), Path(path).name
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**SHAPES[shape])
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval(), f"random-init {shape} shape"


def schedule_tag(path: str) -> str:
    """Short name of a recorded schedule file: precision_schedule_smollm2_translate.json -> translate,
    precision_schedule_qwen2.5-coder-1.5b_translate.json -> qwen2.5-coder-1.5b_translate."""
    stem = Path(path).stem.removeprefix("precision_schedule_").removeprefix("smollm2").strip("_")
    return stem or "chat"


def load_schedule(path: str) -> tuple[list[float], dict[str, list[tuple[int, int]]]]:
    """Per-step confidences and, per verified variant present, the rounds (k, accepted) of a recorded file."""
    rec = json.loads(Path(path).read_text())["records"]
    scores = [s for r in rec for s in r["lossy"]["scores"]]
    rounds = {key: [tuple(x) for r in rec for x in r[key]["rounds"]]
              for key in ("verified", "verified_always") if key in rec[0]}
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
def forward_ms(engine: GraphDecodeEngine, tier: str, q: int, iters: int = 50) -> float:
    """Mean ms of one graph replay of ``tier`` over ``q`` tokens at a fixed position (cost-model input)."""
    start = engine.position
    toks = torch.ones(engine.config.batch_size, q, dtype=torch.long, device=engine.device)
    engine.forward(tier, toks, start)
    _sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        engine.forward(tier, toks, start)
    _sync()
    engine.position = start
    return (time.perf_counter() - t0) / iters * 1e3


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
        seq = torch.cat([last] * (max_draft + 1))[None] if k else last[None]
        top = engine.forward(engine.tiers.top, seq, start)[0].argmax(-1)
        top[0].item()  # the per-round host read of the real loop
        engine.position = start + acc + 1
        last, produced, i = top[:1], produced + acc + 1, i + 1
    return produced


@dataclass
class BatchRun:
    """One batch size's engine, prompt and results; ``run`` times a mode and stores its speed."""

    tiers: object
    engine: GraphDecodeEngine
    ids: torch.Tensor  # (B, prompt_len)
    args: argparse.Namespace
    t_prefill: float = 0.0
    res: dict = field(default_factory=dict)
    decoders: dict = field(default_factory=dict)
    save: object = None  # called after every mode (a cut-off run keeps what it measured)

    def run(self, mode: str, fn) -> object:
        t, out = timed(fn, self.args.repeats)
        tokens = self.ids.shape[0] * (self.args.new_tokens - 1)
        decode_s = t - self.t_prefill  # <= 0 only in noisy CPU smoke runs: reported as NaN, not as a speed
        decode_s = decode_s if decode_s > 0 else float("nan")
        self.res[mode] = {"seconds": t, "decode_tokens_per_s": tokens / decode_s,
                          "ms_per_step": decode_s / (self.args.new_tokens - 1) * 1e3}
        if self.save is not None:
            self.save()
        return out

    def fused(self, policy: PrecisionPolicyConfig | None = None, compiled: bool = False, **kw) -> torch.Tensor:
        """Fused-step decode; with ``policy``, a live controller reads the in-graph decisions."""
        ctl = PrecisionController(self.tiers, policy, read_raw_logits=False) if policy else None
        key = (policy, compiled)
        if key not in self.decoders:  # one decoder (and its captured graphs) per policy / compile
            self.decoders[key] = FusedStepDecoder(self.engine, decision_for(ctl) if ctl else None,
                                                  capacity=self.args.new_tokens, compile_step=compiled)
        try:
            return self.decoders[key].generate(
                self.ids, DecodeOptions(max_new_tokens=self.args.new_tokens, controller=ctl, **kw))
        finally:
            if ctl is not None:
                ctl.close()


def bench_fused(br: BatchRun, schedules: dict, prefix: str = "", compiled: bool = False) -> torch.Tensor:
    """Fixed tiers, lossy replays and controller overhead on the fused path; returns native tokens."""
    native = br.run(f"{prefix}native", lambda: br.fused(tier="native", compiled=compiled))
    br.run(f"{prefix}int4", lambda: br.fused(tier="int4", compiled=compiled))
    for tag, (scores, _) in schedules.items():
        for high in br.args.high:
            sched = tier_schedule(scores, high)
            br.run(f"{prefix}lossy_{tag}_high{high}",
                   lambda: br.fused(LOSSY, compiled=compiled, schedule=sched, decision_lag=1))
    for lag in () if br.args.skip_controller else (0, 1):
        br.run(f"{prefix}controller_native" + ("_lag1" if lag else ""),
               lambda: br.fused(ALWAYS_NATIVE, compiled=compiled, decision_lag=lag))
    return native


def bench_verified(br: BatchRun, native: torch.Tensor, schedules: dict) -> None:
    """Batch-1 verified modes on these weights, the recorded replays, and the cost model inputs."""
    n = br.args.new_tokens
    ref, ref_logits = greedy_with_logits(br.engine, br.ids, n)
    br.res["native"]["reproducible"] = bool(torch.equal(ref, native))
    for mode, adaptive in (("verified", True), ("verified_always_draft", False)):
        draft = DraftOptions(max_draft=br.args.max_draft, policy=LOSSY, adaptive=adaptive)
        opts = DecodeOptions(max_new_tokens=n, draft=draft)

        def run(opts=opts):
            opts.draft.clear_record()  # keep the last run's rounds (and near-tie count) only
            return generate_verified(br.engine, br.ids, opts)

        out = br.run(mode, run)
        h = draft.history
        br.res[mode].update(mismatch_report(out, ref, ref_logits, torch.bfloat16),
                            rounds=len(h), rounds_with_draft=sum(k > 0 for k, _ in h),
                            drafted_per_round=statistics.mean(k for k, _ in h) if h else 0,
                            accepted_per_round=statistics.mean(a for _, a in h) if h else 0,
                            near_tie_rounds=draft.tie_rounds)
    del ref_logits
    rounds = {f"{key}_{tag}": recorded for tag, (_, by_key) in schedules.items() for key, recorded in by_key.items()}
    for key, recorded in rounds.items():
        br.run(f"{key}_replay", lambda: replay_verified(br.engine, br.ids, recorded, n, br.args.max_draft))
    br.engine.prefill(br.ids)
    br.res["step_ms"] = {"native_1": forward_ms(br.engine, "native", 1), "int4_1": forward_ms(br.engine, "int4", 1),
                         f"native_{br.args.max_draft + 1}": forward_ms(br.engine, "native", br.args.max_draft + 1)}
    br.res["verified_cost_model"] = verified_cost_model(br.res["step_ms"], rounds, br.args.max_draft)


def make_run(tiers, batch: int, args, compile: bool = False) -> BatchRun:
    ids = torch.randint(1, tiers.model.config.vocab_size, (batch, args.prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    verify = args.max_draft + 1 if batch == 1 else 0
    engine = GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=batch, verify_len=verify,
                                                        max_len=args.prompt_len + args.new_tokens + verify + 8,
                                                        compile=compile))
    br = BatchRun(tiers, engine, ids, args)
    br.t_prefill, _ = timed(lambda: engine.prefill(ids), args.repeats)
    return br


def bench_batch(tiers, batch: int, args, schedules: dict) -> BatchRun:
    """All non-compiled modes at one batch size."""
    br = make_run(tiers, batch, args)
    native = bench_fused(br, schedules)
    ctl = PrecisionController(tiers, ALWAYS_NATIVE, read_raw_logits=False)
    br.run("eager_controller_native", lambda: decode(br.engine, br.ids, DecodeOptions(
        max_new_tokens=args.new_tokens, controller=ctl)))
    ctl.close()
    if batch == 1:
        bench_verified(br, native, schedules)
    return br


def finish(res: dict) -> dict:
    """Speedups vs native and controller-overhead fractions (per prefix present)."""
    for mode in [m for m, r in res.items() if isinstance(r, dict) and "seconds" in r]:
        base = "compiled_native" if mode.startswith("compiled_") else "native"
        if base in res:
            res[mode]["speedup_vs_native"] = res[mode]["decode_tokens_per_s"] / res[base]["decode_tokens_per_s"]
    for prefix in ("", "compiled_"):
        for suffix in ("", "_lag1"):
            if f"{prefix}controller_native{suffix}" in res:
                ms = res[f"{prefix}controller_native{suffix}"]["ms_per_step"]
                res[f"{prefix}controller{suffix}_overhead_fraction"] = ms / res[f"{prefix}native"]["ms_per_step"] - 1
    if "eager_controller_native" in res:
        res["eager_controller_overhead_fraction"] = (res["eager_controller_native"]["seconds"]
                                                     / res["native"]["seconds"] - 1)
    return res


def bench_compiled(tiers, batch: int, args, schedules: dict, save=None) -> dict:
    """The fused modes with compiled steps (and, at batch 1, verified mode on a compiled engine), keys
    prefixed ``compiled_``; ``save(results so far)`` runs after every mode."""
    br = make_run(tiers, batch, args, compile=True)

    def prefixed() -> dict:
        return {f"compiled_{k}": v for k, v in br.res.items()}

    if save is not None:
        br.save = lambda: save(prefixed())
    native = bench_fused(br, schedules, compiled=True)
    if batch == 1:
        bench_verified(br, native, schedules)
    return prefixed()


def bench_previous_prep(args) -> dict:
    """Batch-1 native / int4 with tiers prepared as before (decoder linears only, unfused)."""
    model, _ = build_model(args.model, args.device, args.config_dir, args.shape)
    tiers = prepare_tiers(model, tiers=("int4", "native"), lm_head=False, fuse=False)
    br = make_run(tiers, 1, args)
    br.run("native", lambda: br.fused(tier="native"))
    br.run("int4", lambda: br.fused(tier="int4"))
    out = {f"prev_prep_{m}": r for m, r in br.res.items()}
    out["prev_prep_tier_weight_bytes"] = tiers.memory_bytes()
    del br, tiers, model
    if args.device == "cuda":
        torch.cuda.empty_cache()  # benchmark script, not library code: give the copy's memory back
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="local checkpoint dir; default a random-init Llama of --shape")
    ap.add_argument("--config-dir", default=None,
                    help="config-only dir (config.json): that architecture with seeded random weights")
    data = Path(__file__).parent / "data"
    ap.add_argument("--schedule", nargs="+", default=[os.path.relpath(p) for p in (  # relative: no machine path
        data / "precision_schedule_smollm2.json", data / "precision_schedule_smollm2_translate.json") if p.exists()],
        help="recorded schedules to replay (default: the chat and translation recordings present)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-draft", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--high", type=float, nargs="+", default=[0.9, 0.75, 0.5],
                    help="fast-tier thresholds for the lossy replay (0.9 = the policy's default)")
    ap.add_argument("--compile", action="store_true", help="also the fused steps under torch.compile (last)")
    ap.add_argument("--compile-only", action="store_true", help="only the compiled sections (implies --compile)")
    ap.add_argument("--compile-batch-sizes", type=int, nargs="+", default=[1], help="batch sizes of --compile")
    ap.add_argument("--no-prev-prep", action="store_true", help="skip the previous-preparation ablation")
    ap.add_argument("--skip-controller", action="store_true",
                    help="skip the controller-overhead modes (one decoder, i.e. one compile, fewer)")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only smoke-tests the script")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b",
                    help="random-init Llama shape when neither --model nor --config-dir is given")
    ap.add_argument("--smoke-shape", action="store_true", help="same as --shape smoke (for --device cpu)")
    ap.add_argument("--int4-kernel", default="auto", choices=("auto", "triton", "tinygemm"),
                    help="CUDA int4 kernel of the fast tier (auto = tinygemm; triton: ours)")
    return ap.parse_args()


def int4_launches(tiers) -> dict[str, str]:
    """Which int4 kernel each distinct (N, K) runs, with the tuned Triton launch (for the report)."""
    out = {}
    for module in tiers.modules + [g.fused for g in tiers.groups]:
        fmt = module.formats.get("int4")
        if fmt is not None:
            launch = getattr(fmt, "gemv", None)
            out[f"{fmt.out_features}x{fmt.in_features}"] = f"triton {launch}" if launch else type(fmt).__name__
    return out


def main() -> None:
    args = parse_args()
    args.compile = args.compile or args.compile_only
    if args.device == "cpu":
        torch.set_num_threads(1)  # smoke test on shared CPUs: OpenMP spinning made tiny steps take 100+ ms
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_precision.py needs a CUDA GPU (the speedup only shows under CUDA graphs)")
    if args.smoke_shape:
        args.shape = "smoke"
    model, weights = build_model(args.model, args.device, args.config_dir, args.shape)
    tiers = prepare_tiers(model, tiers=("int4", "native"), int4_kernel=args.int4_kernel)
    schedules = {schedule_tag(p): load_schedule(p) for p in args.schedule}
    env = environment(args.device)
    if args.device != "cuda":
        env["card"] += " (smoke test, not a benchmark)"
    result = {**env, "weights": weights,
              "schedules": {schedule_tag(p): p for p in args.schedule},
              "int4_kernel": args.int4_kernel, "int4_launches": int4_launches(tiers),
              "tier_weight_bytes": tiers.memory_bytes(), "int4_unsupported_linears": tiers.unsupported,
              "schedule_fast_fraction": {tag: {str(h): tier_schedule(sc, h).count("int4") / len(sc) for h in args.high}
                                         for tag, (sc, _) in schedules.items()}, "batches": {}}
    out_dir, start = Path(args.out), time.perf_counter()
    runs = {}
    for batch in tqdm([] if args.compile_only else args.batch_sizes, desc="batch sizes"):
        runs[batch] = bench_batch(tiers, batch, args, schedules)
        result["batches"][str(batch)] = finish(runs[batch].res)
        write_outputs(out_dir, result)
    if 1 in runs and not args.no_prev_prep:
        runs[1].res.update(bench_previous_prep(args))
        finish(runs[1].res)
        write_outputs(out_dir, result)
    if args.compile:
        for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch releases
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)  # one compile per (decoder, tier, Q): > default 8
        for batch in tqdm(args.compile_batch_sizes, desc="compiled batch sizes"):
            res = runs[batch].res if batch in runs else {}

            def save(partial: dict, res=res, batch=batch) -> None:
                res.update(partial)
                result["batches"][str(batch)] = finish(res)
                write_outputs(out_dir, result)

            try:
                res.update(bench_compiled(tiers, batch, args, schedules, save))
            except Exception as exc:  # a compile failure must not lose the measured sections above
                result.setdefault("compile_error", {})[str(batch)] = f"{type(exc).__name__}: {exc}"[:2000]
            result["batches"][str(batch)] = finish(res)
            write_outputs(out_dir, result)
    result["wall_seconds"] = time.perf_counter() - start
    result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    write_outputs(out_dir, result)
    print((out_dir / "results.md").read_text())


if __name__ == "__main__":
    main()
