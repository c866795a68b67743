"""The lossless draft cascade through ``model.generate``, replaying acceptance recorded on real text, against greedy.

Speed of the cascade depends on how many drafts the verifier keeps, which random weights cannot show. So the rounds
come from ``eval/record_draft_acceptance.py`` (a real model on the dev set, CPU): every round's drafter, draft length
and accepted count. Here, on a random-init model of a real shape, ``ReplayCandidateGenerator`` runs each recorded
round for real, through ``model.generate(custom_generate=cascade_decoding, candidate_generator=...)``:

- the round's drafter does its work (a self-draft runs its k int4 forwards from the shared cache and crops them; a
  lookup runs the n-gram match), so the draft costs what it costs;
- the proposed tokens are then replaced by greedy's own next tokens for the recorded accepted count, and a wrong token
  after them, so the verifier (one real top-tier forward over k + 1 tokens) keeps exactly the recorded count.

Greedy's tokens come from a plain ``model.generate`` of the same prompt first (the reference). The cascade is lossless,
so its output must equal the reference (``identical``); ``accepted_as_scheduled`` is the share of the recorded accepted
tokens the verifier kept (1.0 unless a near-tie flips between the verify forward's and greedy's matmul shapes). A
random-init model's top-2 logits are near-ties (among 128k Gaussian logits the gap is a few % of the top one, and
scaling the head scales both), so in 16 bits a flip came within 3 to 12 tokens on the 8B shape and the replay lost its
alignment. So the replay model's margins are made wide (``widen_margins``): its input embedding is scaled by
``--embed-scale`` and the head set to it, so the residual stream is dominated by the token's own embedding and greedy
decoding repeats its token by a margin of ~60 standard deviations of the other logits. The work per step (shapes,
bytes, kernels) is that of the real shape; only the values that pick the tokens differ.
Timing as ``bench_generate.py``: decode ms/token = (t(N new) - t(1 new)) / (N - 1), median of ``--repeats`` calls
after a warm-up of each mode. Modes: ``native_eager`` (DynamicCache, compile disabled) and ``cascade_eager`` (the
cascade on DynamicCache, every forward eager); on CUDA (or with ``--compile-on-cpu``) also ``native_compiled``
(StaticCache, generate's compiled step), ``native_overlapped`` (the same with the stop flag read one step late,
``hf_adaptive.overlap``), ``draft_tier_compiled`` (the int4 tier decoding alone as ``native_compiled``; over it,
``draft_step_cost``), ``cascade_compiled`` (the cascade on StaticCache: its verify forwards at fixed widths and its
int4 draft steps through generate's compiled call, cudagraph trees) and ``cascade_captured`` (the same forwards as
the cascade's own CUDA graphs, ``CascadeCandidateGenerator(step_graphs=True)``). With the captured path, greedy is
also timed through captured decode steps (``install_decode_graphs``): ``native_captured`` (stop flag read every step)
and ``native_captured_overlapped`` (read one step late), the fastest native paths. Every ratio is taken in the same
run; identity and ``accepted_as_scheduled`` are reported per cascade mode.

GPU (Llama-3.1-8B shape, the modernize schedule of Qwen2.5-Coder-1.5B, a 64- and a 4096-token prompt):
    python eval/bench_cascade_replay.py --shape llama-3.1-8b --contexts 64,4096 \
        --schedule eval/results/quality_draft_acceptance_modernize_qwen1.5b_cpu/draft_acceptance.json \
        --out eval/results/precision_cascade_replay_h100
CPU smoke size (float32, exact):
    python eval/bench_cascade_replay.py --device cpu --dtype float32 --shape tiny --contexts 24 --new-tokens 12 \
        --schedule eval/results/quality_draft_acceptance_smollm2_cpu/draft_acceptance.json --out /tmp/cascade_replay
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from _common import environment, pyplot, save_figure  # first: sets the offline default
from _generate_timing import (SHAPES, CaptureCounter, add_run_arguments, build_model, choice_list, generate_once,
                              int_list, stop_check_variant,
                              prepare_run, prompt, timed_calls)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import CompileConfig, DynamicCache, StaticCache  # noqa: E402

from hf_adaptive.evaluation.report import markdown_table, write_report  # noqa: E402
from hf_adaptive.policy.draft_policy import NO_DRAFT, DraftChoice, DraftPolicyConfig  # noqa: E402
from hf_adaptive.precision.cascade import cascade_decoding  # noqa: E402
from hf_adaptive.precision.decode_graphs import install_decode_graphs  # noqa: E402
from hf_adaptive.precision.drafting import CascadeCandidateGenerator  # noqa: E402
from hf_adaptive.precision.tiers import INT4_KERNELS, PrecisionTiers, prepare_tiers  # noqa: E402
from hf_adaptive.validation import arg_number  # noqa: E402

logger = logging.getLogger("bench_cascade_replay")
RUNS = ("lookup", "self", "cascade")  # the recorded runs: each drafter alone, and both under the policy
PATH_MODES = {"trees": "cascade_compiled", "captured": "cascade_captured"}  # --paths: how compiled forwards run


def recorded_stop(path: Path) -> tuple[float | None, int]:
    """The recording's own-confidence stop (``DraftPolicyConfig.self_stop``, None if it had none) and its self-draft
    cap, from a ``record_draft_acceptance.py`` JSON."""
    data = json.loads(Path(path).read_text())
    return data.get("self_stop"), int(data.get("max_self_draft", 0))


def load_rounds(path: Path, run: str) -> list[tuple[str, int, int]]:
    """Every recorded round (drafter, proposed, accepted) of ``run``, verse after verse, from a
    ``record_draft_acceptance.py`` JSON."""
    data = json.loads(Path(path).read_text())
    rounds = []
    for verse in data.get("verses", []):
        recorded = verse.get("runs", {}).get(run)
        if recorded is None:
            continue
        cols = recorded["rounds_columns"]
        for r in recorded["rounds"]:
            row = dict(zip(cols, r))
            rounds.append((row["drafter"], int(row["proposed"]), int(row["accepted"])))
    if not rounds:
        raise ValueError(f"--schedule {path}: no rounds of run {run!r}; record them with "
                         f"eval/record_draft_acceptance.py (runs: {', '.join(RUNS)})")
    return rounds


class ReplayCandidateGenerator(CascadeCandidateGenerator):
    """Drafts that follow recorded rounds: each round's drafter does its real work, then the proposal is greedy's
    next ``accepted`` tokens from ``reference`` and one wrong token, so the verifier keeps the recorded count.

    Args:
        tiers: as for ``CascadeCandidateGenerator`` (its cheapest tier self-drafts).
        reference: (1, N) the tokens greedy decoding emits after the prompt.
        rounds: (drafter, proposed, accepted) per round, replayed in order, from the start at every generation.
        stop: the recording's ``(self_stop, max_self_draft)`` (``recorded_stop``): with a stop, the self-draft runs
            as the product's does, computing and copying each step's p_max (the replay model's wide margins keep it
            from firing, so the recorded length is kept), and a recorded self round that stopped at its token k < cap
            with k > ``sync`` drafts one token more, never accepted: past its first ``sync`` steps the CUDA drafter
            reads a step's p_max after queueing the next step, where the CPU recording read it at once.
        sync: ``DraftPolicyConfig.self_stop_sync`` of the replayed drafter.
        step_graphs: the generator's ``step_graphs`` (compiled forwards as its own CUDA graphs on a StaticCache).
    """

    def __init__(self, tiers: PrecisionTiers, reference: torch.Tensor, rounds: list[tuple[str, int, int]],
                 stop: tuple[float | None, int] = (None, 0), sync: int = 0, step_graphs: bool = False) -> None:
        self_stop, self.cap = stop
        self.late = self_stop is not None and tiers.model.device.type == "cuda"
        longest = max(k for _, k, _ in rounds) + int(self.late)
        super().__init__(tiers, DraftPolicyConfig(max_lookup_tokens=max(longest, 1), max_self_draft=max(longest, 1),
                                                  self_stop=self_stop, self_stop_sync=sync),
                         step_graphs=step_graphs)
        self.reference = reference
        self.rounds = rounds
        self.scheduled_accepted = 0
        self.stops_fired = 0
        self.diverged_at: int | None = None
        self._next = 0
        self._prompt_len: int | None = None

    def bind(self, cache, eos_token_id: torch.Tensor | None, max_length: int, forward=None) -> None:
        super().bind(cache, eos_token_id, max_length, forward)
        self._next, self._prompt_len, self.scheduled_accepted, self.diverged_at = 0, None, 0, None
        self.stops_fired = 0  # self-drafts the own-confidence stop cut short of the recorded length (goal 0)

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, None]:
        begin = time.perf_counter_ns()
        if self._prompt_len is None:  # the first round follows the prefill's token
            self._prompt_len = input_ids.shape[1] - 1
        done = input_ids.shape[1] - self._prompt_len  # tokens emitted so far
        if self.diverged_at is None and not torch.equal(input_ids[0, self._prompt_len:],
                                                        self.reference[0, :done].to(input_ids.device)):
            self.diverged_at = done
        drafter, k, accepted = self.rounds[self._next % len(self.rounds)]
        self._next += 1
        if drafter == "self" and self.late and self.config.self_stop_sync < k < self.cap:
            k += 1  # the step queued before the doubtful one's p_max is read
        k = max(0, min(k, self._lookup.max_length - input_ids.shape[1] - 1, self.reference.shape[1] - done))
        accepted = min(accepted, k)
        if drafter == "self" and k:  # the draft's real cost: k int4 forwards, cropped
            self.stops_fired += int(self._self_drafts(input_ids, k).shape[1] < k)
        elif drafter == "lookup":
            self._lookup_drafts(input_ids)
        drafts = self.reference[:, done:done + k].to(input_ids.device).clone()
        if accepted < k:  # the verifier rejects here: any token but greedy's
            drafts[0, accepted] = (drafts[0, accepted] + 1) % self.tiers.model.config.vocab_size
        self.scheduled_accepted += accepted
        self.choice = DraftChoice(drafter if k else NO_DRAFT, k)
        self.draft_ns = time.perf_counter_ns() - begin
        return torch.cat([input_ids, drafts], dim=1), None


@torch.no_grad()
def widen_margins(model, scale: float) -> None:
    """Scale the input embedding by ``scale`` and set the output head to it, so greedy decoding of a random-init model
    picks its next token (the current one) by a margin no 16-bit rounding difference between the verify's and
    greedy's matmul shapes can flip: the embedding (|e| ~ 0.02 sqrt(D) scale) outweighs the layers' updates."""
    embedding = model.get_input_embeddings().weight
    embedding.mul_(scale)
    head = model.get_output_embeddings().weight
    if head.data_ptr() != embedding.data_ptr():
        head.copy_(embedding)


def decode_ms(model, ids, cache_for_call, new_tokens: int, repeats: int, device: str, counter=None,
              **kwargs) -> dict:
    """Decode ms/token of ``timed_calls`` (the project's one timing rule) after one warm-up call of N tokens; with a
    ``CaptureCounter``, also the dynamo graphs and CUDA-graph captures the timed calls still made (goal 0)."""
    generate_once(model, ids, cache_for_call(), new_tokens, device, **kwargs)  # warm-up (compiles, captures)
    graphs0, captures0 = (counter.dynamo_graphs(), counter.captures) if counter else (0, 0)
    out = {"ms": timed_calls(model, ids, cache_for_call, new_tokens, repeats, device, **kwargs)["decode_ms_per_token"]}
    if counter:
        out.update(recompiles=counter.dynamo_graphs() - graphs0, captures=counter.captures - captures0)
    return out


def _record(row: dict, mode: str, timing: dict) -> None:
    """``timing`` of ``decode_ms`` into ``row`` as MODE_ms (and MODE_recompiles / MODE_captures after warm-up)."""
    row[f"{mode}_ms"] = timing["ms"]
    row.update({f"{mode}_{k}": v for k, v in timing.items() if k != "ms"})


def _compile_kwargs(args) -> dict:
    """generate's compile arguments: its defaults on CUDA; ``--compile-on-cpu`` compiles on the CPU too (with
    ``--compile-backend``, e.g. ``eager`` for dynamo's tracing and guards without code generation)."""
    if args.device.startswith("cuda") and args.compile_backend == "inductor":
        return {}
    config = CompileConfig(backend=args.compile_backend)
    config._compile_all_devices = args.compile_on_cpu  # transformers' switch for compiling on any device
    return {"compile_config": config}


def _cascade(model, ids, gen: ReplayCandidateGenerator, reference: torch.Tensor, cache_for_call, extra: dict,
             args, counter=None) -> dict:
    """Decode ms/token of the replayed cascade through ``generate``, then one more call checked against greedy."""
    kwargs = {"custom_generate": cascade_decoding, "candidate_generator": gen, **extra}
    timing = decode_ms(model, ids, cache_for_call, args.new_tokens, args.repeats, args.device, counter, **kwargs)
    gen.telemetry.reset()
    out = generate_once(model, ids, cache_for_call(), args.new_tokens, args.device, **kwargs)["tokens"]
    report = gen.telemetry.report()
    kept = sum(d["accepted"] for d in report["drafters"].values())
    return {"timing": timing, "identical": bool(torch.equal(out, reference)), "diverged_at": gen.diverged_at,
            "accepted_as_scheduled": kept / gen.scheduled_accepted if gen.scheduled_accepted else None,
            "stops_fired": gen.stops_fired, "verify_forwards": report["verify_forwards"],
            "tokens_per_verify": report["tokens_per_verify"],
            "draft_steps": sum(d["proposed"] for name, d in report["drafters"].items() if name == "self")}


def bench_context(model, tiers: PrecisionTiers, rounds, context: int, args, counter=None,
                  stop: tuple[float | None, int] = (None, 0), on_row=None) -> list[dict]:
    """The reference, the baselines (native, and the draft tier decoding alone) and the replayed cascade (eager once,
    compiled at every ``--self-stop-sync``) at one prompt length: one row per ``self_stop_sync``. ``on_row`` (if
    given) gets this context's rows so far after every mode, the current row included."""
    ids = prompt(model.config.vocab_size, 1, context, context * 31 + 1, args.device)
    reference = generate_once(model, ids, DynamicCache(), args.new_tokens, args.device,
                              disable_compile=True)["tokens"]
    base = {"context": context, "new_tokens": args.new_tokens}
    compiled = args.device.startswith("cuda") or args.compile_on_cpu
    longest = max(k for _, k, _ in rounds) + 1
    # room for the fixed-width verify of the last round: every round of the compiled cascade runs its graph
    room = context + args.new_tokens + 1 + longest
    static = StaticCache(config=model.config, max_cache_len=room)

    def reset_static():
        static.reset()
        return static

    if args.eager:
        _record(base, "native_eager", decode_ms(model, ids, DynamicCache, args.new_tokens, args.repeats, args.device,
                                                disable_compile=True))
    if compiled:
        _record(base, "native_compiled", decode_ms(model, ids, reset_static, args.new_tokens, args.repeats,
                                                   args.device, counter, **_compile_kwargs(args)))
    overlapped = stop_check_variant(StaticCache(config=model.config, max_cache_len=room), "static_deferred")

    def reset_overlapped():
        overlapped.reset()
        return overlapped

    if compiled and args.extra_baselines:
        _record(base, "native_overlapped", decode_ms(model, ids, reset_overlapped, args.new_tokens, args.repeats,
                                                     args.device, **_compile_kwargs(args)))
        with tiers.use(tiers.fast):  # the draft tier decoding alone: what one draft step costs against native
            _record(base, "draft_tier_compiled", decode_ms(model, ids, reset_static, args.new_tokens, args.repeats,
                                                           args.device, **_compile_kwargs(args)))
        base["draft_step_cost"] = base["draft_tier_compiled_ms"] / base["native_compiled_ms"]
    if compiled and "captured" in args.paths:  # greedy through captured decode steps too: the fastest native path
        with install_decode_graphs(model, tiers, compile_backend=args.compile_backend):
            for mode, reset in (("native_captured", reset_static), ("native_captured_overlapped", reset_overlapped)):
                _record(base, mode, decode_ms(model, ids, reset, args.new_tokens, args.repeats, args.device,
                                              **_compile_kwargs(args)))
    rows = []
    for i, sync in enumerate(args.self_stop_sync):
        row = dict(base, self_stop_sync=sync)
        modes = {}
        if args.eager and i == 0:
            modes["cascade_eager"] = (DynamicCache, {"disable_compile": True})
        if compiled:  # through generate's compiled call (cudagraph trees), and through the cascade's own graphs
            for path in args.paths:
                modes[PATH_MODES[path]] = (reset_static, _compile_kwargs(args))
        for mode, (cache_for_call, extra) in modes.items():
            gen = ReplayCandidateGenerator(tiers, reference, rounds, stop, sync, step_graphs=mode == "cascade_captured")
            try:
                got = _cascade(model, ids, gen, reference, cache_for_call, extra, args,
                               counter if mode != "cascade_eager" else None)
            except Exception as exc:  # one path failing (e.g. a capture) must not lose the other modes' numbers
                row[f"{mode}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                logger.exception("bench_cascade_replay: %s failed", mode)
                continue
            _record(row, mode, got.pop("timing"))
            row.update({f"{mode}_{k}": got[k] for k in ("identical", "diverged_at", "accepted_as_scheduled",
                                                        "stops_fired", "draft_steps")},
                       verify_forwards=got["verify_forwards"], tokens_per_verify=got["tokens_per_verify"])
            for ref in ("native_eager", "native_compiled", "native_overlapped", "native_captured",
                        "native_captured_overlapped"):
                if f"{ref}_ms" in row:
                    row[f"{mode}_vs_{ref}"] = row[f"{ref}_ms"] / row[f"{mode}_ms"]
            tqdm.write(f"{mode} (sync {sync}): {json.dumps(row)}")  # in the log even if the run is cut short
            if on_row is not None:
                on_row(rows + [row])
        rows.append(row)
    return rows


def _sync_list(text: str) -> list[int]:
    """``--self-stop-sync``: a comma list of counts >= 0 (checked here, before a model is built)."""
    try:
        values = int_list(text)
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"--self-stop-sync takes counts >= 0 such as 0,1,8, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b", help="random-init Llama shape")
    p.add_argument("--contexts", type=int_list, default=int_list("64,4096"), help="prompt lengths (batch 1)")
    p.add_argument("--schedule", type=Path, required=True, help="a record_draft_acceptance.py JSON")
    p.add_argument("--run", choices=RUNS, default="cascade", help="which recorded run's rounds to replay")
    p.add_argument("--new-tokens", type=arg_number(minimum=3, integer=True), default=64)
    p.add_argument("--repeats", type=arg_number(minimum=1, integer=True), default=2)
    p.add_argument("--embed-scale", type=arg_number(minimum=0.0, min_open=True), default=100.0,
                   help="widen_margins' factor: the input embedding's (and so the head's) scale")
    p.add_argument("--self-stop-sync", type=_sync_list, default=_sync_list("0"),
                   help="DraftPolicyConfig.self_stop_sync values to replay (comma list; one compiled cascade each)")
    p.add_argument("--int4-kernel", choices=INT4_KERNELS, default="auto",
                   help="the draft tier's CUDA int4 kernel (prepare_tiers' int4_kernel)")
    p.add_argument("--paths", type=lambda text: choice_list(p, text, tuple(PATH_MODES), "--paths"),
                   default=list(PATH_MODES),
                   help="compiled cascades to time: trees (generate's compiled call) and/or captured (the cascade's "
                        "own CUDA graphs, CascadeCandidateGenerator(step_graphs=True))")
    p.add_argument("--no-extra-baselines", dest="extra_baselines", action="store_false",
                   help="skip native_overlapped and draft_tier_compiled (each compiles its own graphs)")
    p.add_argument("--no-eager", dest="eager", action="store_false",
                   help="skip the eager baseline and the eager cascade (compiled modes only)")
    p.add_argument("--compile-on-cpu", action="store_true",
                   help="also time the compiled modes off CUDA (generate compiles on accelerators only by default)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compiled modes (eager: dynamo's tracing without code generation)")
    add_run_arguments(p, "eval/results/precision_cascade_replay", "bench_cascade_replay")
    return p.parse_args(argv)


COLUMNS = ["context", "new_tokens", "self_stop_sync", "native_eager_ms", "native_compiled_ms", "native_overlapped_ms",
           "native_captured_ms", "native_captured_overlapped_ms", "draft_tier_compiled_ms", "draft_step_cost",
           "cascade_eager_ms", "cascade_compiled_ms", "cascade_captured_ms", "cascade_eager_vs_native_eager",
           "cascade_compiled_vs_native_compiled", "cascade_captured_vs_native_compiled",
           "cascade_captured_vs_native_overlapped", "cascade_captured_vs_native_captured",
           "cascade_captured_vs_native_captured_overlapped", "cascade_compiled_vs_native_eager",
           "tokens_per_verify", "verify_forwards", "cascade_compiled_draft_steps", "cascade_captured_draft_steps",
           "cascade_eager_accepted_as_scheduled", "cascade_captured_identical", "cascade_captured_captures",
           "cascade_compiled_accepted_as_scheduled", "cascade_eager_identical", "cascade_compiled_identical",
           "native_compiled_recompiles", "native_compiled_captures", "cascade_compiled_recompiles",
           "cascade_compiled_captures", "cascade_captured_error", "cascade_compiled_error"]


def plot(path: Path, rows: list[dict], title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    modes = [m for m in ("native_eager", "native_compiled", "draft_tier_compiled", "cascade_eager", "cascade_compiled",
                         "cascade_captured")
             if any(f"{m}_ms" in r for r in rows)]
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        ax.bar([j + i * width for j in range(len(rows))], [r.get(f"{mode}_ms", 0) for r in rows], width, label=mode)
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{r['context']} tokens, sync {r['self_stop_sync']}" for r in rows])
    ax.set(ylabel="ms per decoded token", title=title)
    ax.legend()
    save_figure(fig, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    card = prepare_run(args.device)
    rounds, stop = load_rounds(args.schedule, args.run), recorded_stop(args.schedule)
    model = build_model(args.shape, args.device, getattr(torch, args.dtype))
    widen_margins(model, args.embed_scale)
    tiers = prepare_tiers(model, tiers=("int4", "native"), int4_kernel=args.int4_kernel)
    counter = CaptureCounter() if args.device.startswith("cuda") else None
    name = args.name or f"bench_cascade_replay_{args.shape}"
    env = environment(args.device, model=f"random-init {args.shape}", dtype=args.dtype, schedule=str(args.schedule),
                      run=args.run, rounds=len(rounds), embed_scale=args.embed_scale, self_stop=stop[0],
                      int4_kernel=args.int4_kernel)
    done: list[dict] = []

    def report(rows: list[dict]) -> None:
        """The report of the rows so far (rewritten after every mode, so a run cut short keeps what it measured)."""
        write_report(args.out, name, {"rows": rows}, env, markdown_table(rows, COLUMNS),
                     f"Draft cascade replayed through model.generate: random-init {args.shape} on {card}",
                     notes="Each round's drafter runs for real; the proposal then carries greedy's next tokens for the "
                           "recorded accepted count (see the script's docstring). ms per decoded token; speedups "
                           "against the baselines of the same run.")

    for c in tqdm(args.contexts, desc="cascade replay"):
        done.extend(bench_context(model, tiers, rounds, c, args, counter, stop,
                                  on_row=lambda partial: report(done + partial)))
    report(done)
    plot(Path(args.out) / f"{name}.png", done, f"cascade replay, {args.shape}, {card}")

if __name__ == "__main__":
    main()
