"""Precision switching through plain ``model.generate``: the int4 step, the controller's overhead, a switch's cost.

Each configuration (shape x context x batch x cache) prepares the tiers once (``prepare_tiers(model, ("int4",
"native"))``) and times plain greedy ``model.generate`` calls, decode ms/token as in ``bench_generate.py``:

- native: the top tier, no controller;
- int4: the int4 tier for the whole call, no controller (the tier's own step);
- never: ``PrecisionController`` whose bands never choose int4 (``high=1``): the controller's cost when it never
  switches (its confidence, one host read per step, telemetry);
- f=0.25 / 0.5 / 0.75: the same controller, every step's work done, but the tier of the next step taken from an
  evenly spread pattern with a fraction f of int4 steps instead of its bands, so the cost of switching is measured
  against ``predicted = (1 - f) * native + f * int4`` (``vs_predicted``; goal within 3 %).

Caches: ``static`` (``StaticCache``, sdpa) and ``adaptive16`` (``AdaptiveStaticKVCache`` at 16 bits, fused
attention); on CUDA generate compiles the decode step for both. ``adaptive16`` opts into overlapped decoding
(``hf_adaptive.overlap``: generate reads its stop flag one step late and the controller decides from the step before
the last); ``adaptive16_per_step`` opts it out, ``static_deferred`` opts a ``StaticCache`` in (given a crop before
transformers 5.18). ``stop_check_deferred`` per row says what generate did. One warm-up call per mode runs first (every tier's
step compiled and captured), then ``captures_after_warmup`` / ``recompiles_after_warmup`` count what the timed calls
still compile or capture (goal 0: a switch should re-capture nothing). ``--guard-sets lean,full`` times the grid
twice, on a model whose tiers were prepared with ``lean_guards=True`` (dynamo skips the guards on what the tiered
linears fix, ``hf_adaptive.precision.guards``) and then ``False`` (dynamo's full guard set), one after the other in
one process: the ``guards`` column. ``--paths trees,captured`` times each configuration through generate's own compiled
call (cudagraph trees) and through ``install_decode_graphs`` (``hf_adaptive.precision.decode_graphs``: one CUDA graph
per tier captured once, replayed; a switch replays another graph): the ``path`` column, with ``step_captures`` /
``step_fallbacks`` after warm-up (goal 0) and ``step_replays`` (the timed decode steps that ran a captured graph). ``controller_overhead_us`` is the
controller's own host time per step from its telemetry (the wait of its host read reported apart). ``--profile``
then profiles one call of each of ``--profile-modes`` (default ``native`` and ``never``; ``f=0.5`` shows a switching
step) at the first context, batch and guard set (device ms, kernel and CUDA-graph launches, host ms per token, op
tables beside the result): whether a never-switching controller costs device work,
launches or host time the device waits for.

GPU (one H200; about 2 min per configuration at the 8B shape):
    python eval/bench_precision_generate.py --shape llama-3.1-8b --contexts 64,4096 \
        --out eval/results/precision_generate_h200
CPU smoke size (no compile, seconds):
    python eval/bench_precision_generate.py --device cpu --dtype float32 --shape tiny --contexts 32 --new-tokens 6 \
        --out /tmp/bench_precision_generate_cpu
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import environment, pyplot, save_figure  # first: sets the offline default
from _generate_timing import (SHAPES, CaptureCounter, add_run_arguments, build_model, choice_list, generate_once,
                              host_profile_call, int_list, prepare_run, profile_call, prompt, stop_check_variant,
                              timed_calls)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import StaticCache  # noqa: E402

import hf_adaptive  # noqa: E402
from hf_adaptive.evaluation.report import markdown_table, write_report  # noqa: E402
from hf_adaptive.kv.static import AdaptiveStaticKVCache  # noqa: E402
from hf_adaptive.overlap import stop_check_deferred  # noqa: E402
from hf_adaptive.precision.controller import PrecisionController, default_policy_config  # noqa: E402
from hf_adaptive.precision.decode_graphs import DecodeGraphs, install_decode_graphs  # noqa: E402
from hf_adaptive.precision.tiers import PrecisionTiers, prepare_tiers  # noqa: E402
from hf_adaptive.validation import arg_number  # noqa: E402

CACHES = ("static", "static_deferred", "adaptive16", "adaptive16_per_step")
DEFAULT_CACHES = ("static", "adaptive16")
FRACTIONS = (0.25, 0.5, 0.75)
PATHS = ("trees", "captured")  # generate's compiled call; the captured step graphs of install_decode_graphs
PROFILED_MODES = ("native", "never")  # by default, what a controller that never switches adds, profiled


@dataclass
class SpreadPattern:
    """A stand-in for ``PrecisionPolicy`` with a fixed answer: decode step i runs the fast tier exactly when
    ``floor((i + 1) f) > floor(i f)``, so a fraction ``f`` of the steps, spread evenly (f = 0.5 alternates)."""

    fraction: float
    fast: str
    top: str
    step: int = 0
    current: str = field(init=False)

    def __post_init__(self) -> None:
        self.current = self.top

    def reset(self) -> None:
        self.step, self.current = 0, self.top

    def decide(self, scores: list[float]) -> str:
        i, f = self.step, self.fraction
        self.step += 1
        self.current = self.fast if int((i + 1) * f) > int(i * f) else self.top
        return self.current


def make_cache(name: str, model, max_cache_len: int):
    """A fresh cache of kind ``name`` with the attention implementation it runs with."""
    if name.startswith("static"):
        model.set_attn_implementation("sdpa")
        return stop_check_variant(StaticCache(config=model.config, max_cache_len=max_cache_len), name)
    hf_adaptive.enable_fused_attention(model)
    return stop_check_variant(AdaptiveStaticKVCache(model.config, max_cache_len=max_cache_len), name)


def mode_specs(fractions: list[float]) -> dict[str, str | float | None]:
    """Mode name -> what :func:`run_mode` builds for it: None (no controller), "never", or an int4 fraction."""
    modes: dict = {"native": None, "int4": None, "never": "never"}
    modes.update({f"f={f:g}": f for f in fractions})
    return modes


def _controller(tiers: PrecisionTiers, spec: str | float) -> PrecisionController:
    if spec == "never":  # no score exceeds 1: the bands never pick the fast tier
        return PrecisionController(tiers, default_policy_config(tiers, high=1.0, low=0.0))
    ctl = PrecisionController(tiers)
    ctl.policy = SpreadPattern(float(spec), tiers.fast, tiers.top)
    return ctl


def run_mode(model, tiers: PrecisionTiers, mode: str, spec, ids, cache_for_call, args, counter,
             profile_stem: Path | None = None, graphs: DecodeGraphs | None = None) -> dict:
    """Warm-up call, then the timed calls of one mode; with ``profile_stem``, one profiled call under torch.profiler
    and one under cProfile after them (their tables beside the result); the controller (if any) is closed after."""
    ctl = None if spec is None else _controller(tiers, spec)
    tier = tiers.fast if mode == "int4" else tiers.top

    def before_call():
        if ctl is not None:
            ctl.reset()
            ctl.telemetry.reset()
        else:
            tiers.set(tier)

    kwargs = {} if ctl is None else {"logits_processor": [ctl]}
    try:
        before_call()
        generate_once(model, ids, cache_for_call(), args.new_tokens, args.device, **kwargs)  # warm-up
        graphs0 = counter.dynamo_graphs() if counter else 0
        captures0 = counter.captures if counter else 0
        steps0 = (graphs.captures, sum(graphs.fallbacks.values()), graphs.replays) if graphs is not None else None
        row = timed_calls(model, ids, cache_for_call, args.new_tokens, args.repeats, args.device,
                          before_call=before_call, **kwargs)
        if graphs is not None:  # replays > 0 and fallbacks == 0: every timed decode step ran a captured graph
            row.update(step_captures=graphs.captures - steps0[0],
                       step_fallbacks=sum(graphs.fallbacks.values()) - steps0[1],
                       step_replays=graphs.replays - steps0[2])
        row["stop_check_deferred"] = stop_check_deferred()  # as generate decided in the last timed call
        if counter:
            row.update(recompiles_after_warmup=counter.dynamo_graphs() - graphs0,
                       captures_after_warmup=counter.captures - captures0)
        if ctl is not None:
            report = ctl.telemetry.report()  # the last timed call's steps
            row.update(int4_fraction=report["tier_fraction"].get(tiers.fast, 0.0), switches=report["switches"],
                       controller_overhead_us=report["controller_overhead_us"],
                       controller_queue_us=report["controller_queue_us"],
                       controller_decide_us=report["controller_decide_us"],
                       host_read_wait_us=report["host_read_wait_us"], eager_score_steps=report["eager_score_steps"])
        else:
            row["int4_fraction"] = 1.0 if mode == "int4" else 0.0
        if profile_stem is not None:
            before_call()
            row.update(profile_call(model, ids, cache_for_call(), args.new_tokens, args.device, profile_stem, **kwargs))
            before_call()
            row.update(host_profile_call(model, ids, cache_for_call(), args.new_tokens, args.device, profile_stem,
                                         **kwargs))
        return row
    finally:
        if ctl is not None:
            ctl.close()
        tiers.set(tiers.top)


def bench_config(model, tiers, cache_name: str, context: int, batch: int, args, counter,
                 path: str = "trees") -> list[dict]:
    max_cache_len = context + args.new_tokens + 16
    cache = make_cache(cache_name, model, max_cache_len)
    ids = prompt(model.config.vocab_size, batch, context, context * 31 + batch, args.device)

    def cache_for_call():
        cache.reset()  # same buffers every call: a new cache would bring new addresses and new captures
        return cache

    base = {"shape": args.shape, "cache": cache_name, "guards": guard_set(tiers), "path": path, "context": context,
            "batch": batch}
    rows = []
    profiled = (args.profile and (context, batch) == (args.contexts[0], args.batch_sizes[0])
                and guard_set(tiers) == args.guard_sets[0] and path == args.paths[0])
    graphs = install_decode_graphs(model, tiers) if path == "captured" else None
    try:
        for mode, spec in mode_specs(args.fractions).items():
            stem = (Path(args.out) / f"profile_{cache_name}_{mode.replace('=', '').replace('.', 'p')}_n{context}_"
                    f"b{batch}" if profiled and mode in args.profile_modes else None)
            rows.append(base | {"mode": mode} | run_mode(model, tiers, mode, spec, ids, cache_for_call, args, counter,
                                                         stem, graphs))
    finally:
        if graphs is not None:
            graphs.remove()
    return rows


def guard_set(tiers: PrecisionTiers) -> str:
    """"lean" where generate's compiled step skips the guards the tiered linears fix, else "full"."""
    return "lean" if tiers.lean_guards else "full"


def _config_key(r: dict) -> tuple:
    return r["shape"], r["cache"], r.get("guards"), r.get("path", "trees"), r["context"], r["batch"]


def add_predictions(rows: list[dict]) -> list[dict]:
    """Per configuration: every mode over native, and the switching modes against (1 - f) native + f int4."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if "decode_ms_per_token" in r:
            groups.setdefault(_config_key(r), {})[r["mode"]] = r
    for modes in groups.values():
        native, int4 = modes.get("native"), modes.get("int4")
        if native is None:
            continue
        t_n = native["decode_ms_per_token"]
        for r in modes.values():
            r["vs_native"] = r["decode_ms_per_token"] / t_n
            if int4 is not None and r["mode"].startswith("f="):
                f = float(r["mode"][2:])
                r["predicted_ms"] = (1 - f) * t_n + f * int4["decode_ms_per_token"]
                r["vs_predicted"] = r["decode_ms_per_token"] / r["predicted_ms"]
    return rows


def plot(path: Path, rows: list[dict], title: str) -> None:
    """ms/token against the int4 fraction per (cache, context, batch), with the linear prediction."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({_config_key(r) for r in rows if "decode_ms_per_token" in r}, key=str)
    for key in keys:
        pts = {r["mode"]: r for r in rows if _config_key(r) == key and "decode_ms_per_token" in r}
        if "native" not in pts or "int4" not in pts:
            continue
        xs = [0.0] + [float(m[2:]) for m in pts if m.startswith("f=")] + [1.0]
        ys = [pts["native"]["decode_ms_per_token"]] + [pts[m]["decode_ms_per_token"] for m in pts if m.startswith("f=")]
        ys.append(pts["int4"]["decode_ms_per_token"])
        line = ax.plot(xs, ys, "o-", label=f"{key[1]} {key[2]} guards {key[3]} n={key[4]} b={key[5]}")[0]
        ax.plot([0, 1], [ys[0], ys[-1]], "--", color=line.get_color(), alpha=0.5)
        if "never" in pts:
            ax.plot([0], [pts["never"]["decode_ms_per_token"]], "x", color=line.get_color())
    ax.set_xlabel("fraction of decode steps in int4 (x at 0: controller that never switches)")
    ax.set_ylabel("ms per decoded token")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _fractions(text: str) -> list[float]:
    out = [float(x) for x in text.split(",") if x]
    if any(not 0.0 < f < 1.0 for f in out):
        raise argparse.ArgumentTypeError(f"every fraction must lie strictly between 0 and 1, got {text!r}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b", help="random-init Llama shape")
    p.add_argument("--contexts", type=int_list, default=int_list("64,4096"))
    p.add_argument("--batch-sizes", type=int_list, default=int_list("1"))
    p.add_argument("--caches", default=",".join(DEFAULT_CACHES), help=f"comma-separated subset of {CACHES}")
    p.add_argument("--fractions", type=_fractions, default=list(FRACTIONS), help="int4 fractions of the patterns")
    p.add_argument("--new-tokens", type=arg_number(minimum=3, integer=True), default=33)
    p.add_argument("--repeats", type=arg_number(minimum=1, integer=True), default=2)
    p.add_argument("--int4-kernel", default="auto", help="prepare_tiers(int4_kernel=...)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one call of each of --profile-modes at the first context, batch and "
                        "guard set, every cache (torch.profiler, then cProfile): device ms, kernel and graph launches "
                        "and host ms per token, the top ops beside the result")
    p.add_argument("--profile-modes", default=",".join(PROFILED_MODES),
                   help="comma-separated modes --profile profiles: native, int4, never, f=<fraction> of --fractions")
    p.add_argument("--guard-sets", default="lean",
                   help="comma-separated: prepare_tiers(lean_guards=True) ('lean'), dynamo's full guard set ('full'); "
                        "each times the whole grid on its own model, in this order")
    p.add_argument("--paths", default="trees",
                   help="comma-separated: generate's own compiled call ('trees': cudagraph trees), install_decode_graphs "
                        "('captured': a CUDA graph per tier, replayed); each times every cache of the grid")
    p.add_argument("--time-budget-s", type=arg_number(minimum=0.0, min_open=True), default=500.0,
                   help="stop starting configurations after this")
    add_run_arguments(p, "eval/results/precision_generate", "bench_precision_generate")
    args = p.parse_args(argv)
    args.caches = choice_list(p, args.caches, CACHES, "--caches")
    args.guard_sets = choice_list(p, args.guard_sets, ("lean", "full"), "--guard-sets")
    args.paths = choice_list(p, args.paths, PATHS, "--paths")
    args.profile_modes = choice_list(p, args.profile_modes, tuple(mode_specs(args.fractions)), "--profile-modes")
    return args


COLUMNS = ["cache", "guards", "path", "context", "batch", "mode", "decode_ms_per_token", "decode_ms_streamed",
           "vs_native", "predicted_ms", "vs_predicted", "int4_fraction", "switches", "controller_overhead_us",
           "controller_queue_us", "controller_decide_us", "controller_overhead_p50_us", "eager_score_steps",
           "recompiles_after_warmup", "captures_after_warmup", "step_captures", "step_fallbacks", "step_replays",
           "gpu_ms_per_token",
           "kernel_launches_per_token", "graph_launches_per_token", "host_ms_per_token", "skipped"]


def write_results(rows: list[dict], args, card: str, tiers: PrecisionTiers, wall_s: float, planned: int) -> list[dict]:
    """JSON, Markdown and PNG of the rows so far (rewritten after every configuration, so a run stopped by an outer
    time limit leaves a report of what it measured); returns the table's rows."""
    add_predictions(rows)
    done = len({_config_key(r) for r in rows})
    env = environment(args.device, card=card, model=f"random-init {args.shape}", dtype=args.dtype,
                      new_tokens=args.new_tokens, repeats=args.repeats, tiers=list(tiers.ladder),
                      wall_s=round(wall_s, 1), configurations_done=done, configurations_planned=planned)
    table = [{k: (r.get(k).get("mean") if isinstance(r.get(k), dict) else r.get(k)) for k in COLUMNS} for r in rows]
    for line, r in zip(table, rows):
        if isinstance(r.get("controller_overhead_us"), dict):
            line["controller_overhead_p50_us"] = r["controller_overhead_us"]["p50"]
    stem = args.name or f"bench_precision_generate_{args.shape}"
    notes = (f"Timed through model.generate only ({args.repeats} calls after one warm-up per mode, {args.new_tokens} "
             "new tokens). `vs_predicted` = ms/token over (1 - f) native + f int4, both measured in this run. "
             "`controller_overhead_us`: the controller's own host time per step (mean; p50 beside it), split into "
             "`controller_queue_us` (queueing the scores' copy in `__call__`, while the device still runs the "
             "forward) and `controller_decide_us` (reading it and deciding, before the next forward).\n")
    write_report(args.out, stem, {"rows": rows, "args": vars(args)}, env, markdown_table(table, COLUMNS),
                 f"Precision switching through model.generate: random-init {args.shape} on {card}", notes)
    plot(Path(args.out) / f"{stem}.png", rows, f"model.generate, {args.shape} {args.dtype} on {card}")
    return table


def main(argv=None) -> None:
    args = parse_args(argv)
    card = prepare_run(args.device)
    on_gpu = args.device.startswith("cuda")
    t0 = time.perf_counter()
    counter = CaptureCounter() if on_gpu else None
    rows: list[dict] = []
    grid = [(g, c, n, b, path) for g in args.guard_sets for n in args.contexts for b in args.batch_sizes
            for c in args.caches for path in args.paths]
    model = tiers = built_for = None
    for lean, cache_name, context, batch, path in tqdm(grid, desc=f"precision generate {args.shape}"):
        base = {"shape": args.shape, "cache": cache_name, "guards": lean, "path": path, "context": context,
                "batch": batch}
        if built_for != lean:  # a model per guard set: its own compiled steps
            model = tiers = None
            torch._dynamo.reset()
            if on_gpu:
                torch.cuda.empty_cache()
            model = build_model(args.shape, args.device, getattr(torch, args.dtype))
            tiers = prepare_tiers(model, tiers=("int4", "native"), int4_kernel=args.int4_kernel,
                                  lean_guards=lean == "lean")
            built_for = lean
        if time.perf_counter() - t0 > args.time_budget_s:
            rows.append(base | {"skipped": f"--time-budget-s={args.time_budget_s} spent"})
            continue
        try:
            rows.extend(bench_config(model, tiers, cache_name, context, batch, args, counter, path))
        except Exception as err:  # noqa: BLE001  (OOM, missing kernel: recorded with the reason, grid goes on)
            rows.append(base | {"skipped": f"{type(err).__name__}: {str(err)[:160]}"})
            if on_gpu:
                torch.cuda.empty_cache()
        write_results(rows, args, card, tiers, time.perf_counter() - t0, len(grid))
    print(markdown_table(write_results(rows, args, card, tiers, time.perf_counter() - t0, len(grid)), COLUMNS))


if __name__ == "__main__":
    main()
