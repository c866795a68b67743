"""Decode speed and memory of every KV cache through plain ``model.generate``: the user's call, nothing else.

Each configuration (shape x context x batch x cache) is timed the way a user calls it: ``model.generate(input_ids,
max_new_tokens=N, cache=...)`` (``past_key_values=`` before transformers 5.23), greedy, the cache built by its
public constructor, compiled decode left to generate's own auto-compile, nothing inside the call instrumented.
decode ms/token = (t(N new tokens) - t(1 new token)) / (N - 1), each t the median wall time of ``--repeats`` calls
(synchronized before and after): the prefill cancels out, every decode step (a precision switch's host work
included) is in, and it holds whether or not generate syncs with the device every step (``stop_check_deferred``
per row: whether the timed calls read the stop flag one step late, see ``hf_adaptive.overlap``). prefill_s = t(1). One warm-up call of each length per configuration compiles and captures first.

Caches (``--caches``):
- dynamic: ``DynamicCache`` (sdpa, eager decode).
- static: ``StaticCache`` (sdpa); generate compiles its decode step (CUDA graphs).
- static_deferred: the same, opted into overlapped decoding (``hf_adaptive.overlap.defer_stop_checks``): generate
  reads its stop flag one step late, so the host queues the next step while the device runs this one (before
  transformers 5.18 the cache gets a crop that rewinds its device lengths); ``stop_check_deferred`` says.
- adaptive16 / adaptive8 / adaptive4: ``AdaptiveStaticKVCache`` with ``fixed_bits`` (none for 16), fused attention;
  it opts into overlapped decoding by itself.
- adaptive16_per_step: adaptive16 opted out of it (``defer_stop_checks(cache, False)``): the stop flag read every step,
  as transformers does on CUDA; against adaptive16 it is what the overlap alone gains.
- adaptive_budget: ``AdaptiveStaticKVCache`` under ``memory_budget`` = 0.55 x the prompt's 16-bit KV bytes: the
  ladder drops to 4 bits at the prefill and steps back up as the stored bytes relax the pressure, so one call
  switches precision several times (re-captures after the warm-up are counted in ``mixed_captures``).
- eager4: ``AdaptiveKVCache(fixed_bits=4)`` with fused attention (no static shapes, no compile).
- quanto4 / hqq4: transformers ``QuantizedCache`` (skipped, with the reason, when the backend is missing).

Memory: ``kv_gib`` the cache's live KV bytes after the call, ``kv_reserved_gib`` what it allocated,
``peak_gib`` the allocator's peak during the call above what was allocated before it (KV + prefill
transients: activations, logits), ``transient_gib`` = peak - reserved KV.

``--mixed-calls N``: N more calls per compiled cache with prompt lengths and ``max_new_tokens`` drawn at random
under the same ``max_cache_len`` (the cache reused through ``reset()``); the recompiles (new dynamo graphs) and
CUDA graph captures they cause after the warm-up are counted (goal 0).

GPU (one H200, ~6 min for the default grid of one shape):
    python eval/bench_generate.py --shape llama-3.2-1b --out eval/results/kv_generate_h200
CPU smoke size (no compile, seconds):
    python eval/bench_generate.py --device cpu --dtype float32 --shape tiny --contexts 64,128 --batch-sizes 1 \
        --caches dynamic,adaptive4,eager4 --new-tokens 6 --out /tmp/bench_generate_cpu
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from _common import environment, plot_by_context  # first: sets the offline default
from _generate_timing import (SHAPES, CaptureCounter, add_run_arguments, build_model, choice_list, generate_once,
                              host_profile_call, int_list, prepare_run, profile_call, prompt, stop_check_variant,
                              timed_calls)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import DynamicCache, StaticCache  # noqa: E402

import hf_adaptive  # noqa: E402
from hf_adaptive.evaluation.report import markdown_table, write_report  # noqa: E402
from hf_adaptive.kv.cache import AdaptiveKVCache  # noqa: E402
from hf_adaptive.kv.static import AdaptiveStaticKVCache  # noqa: E402
from hf_adaptive.overlap import stop_check_deferred  # noqa: E402

CACHES = ("dynamic", "static", "static_deferred", "adaptive16", "adaptive16_per_step", "adaptive8", "adaptive4",
          "adaptive_budget", "eager4", "quanto4", "hqq4")
REUSED = ("static", "adaptive")  # name prefixes of the caches reused through reset() (compiled, fixed buffers)
OURS_FUSED = ("adaptive16", "adaptive8", "adaptive4", "adaptive_budget", "eager4")
BUDGET_FRACTION_OF_PROMPT = 0.55  # adaptive_budget: the prompt's KV in the model dtype is 1.8x this budget


def prompt_kv_bytes(model, tokens: int, batch: int) -> int:
    """KV bytes of ``tokens`` tokens in the model's dtype (all layers, keys + values)."""
    c = model.config
    return 2 * c.num_hidden_layers * batch * c.num_key_value_heads * c.head_dim * tokens * model.dtype.itemsize


def make_cache(name: str, model, max_cache_len: int, prompt_tokens: int, batch: int, args):
    """A fresh cache of kind ``name`` and the attention implementation it runs with."""
    if name == "dynamic":
        return DynamicCache(config=model.config), "sdpa"
    if name in ("static", "static_deferred"):
        return stop_check_variant(StaticCache(config=model.config, max_cache_len=max_cache_len), name), "sdpa"
    if name in ("quanto4", "hqq4"):
        from transformers import QuantizedCache

        backend = name.removesuffix("4")
        __import__("optimum.quanto" if backend == "quanto" else "hqq")  # ImportError -> recorded as skipped
        return QuantizedCache(backend=backend, config=model.config, nbits=4, q_group_size=64,
                              residual_length=args.residual_length), "sdpa"
    if name == "eager4":
        return AdaptiveKVCache(model.config, fixed_bits=4, residual_length=args.residual_length), "hf_adaptive"
    if name == "adaptive_budget":
        budget = int(BUDGET_FRACTION_OF_PROMPT * prompt_kv_bytes(model, prompt_tokens, batch))
        return AdaptiveStaticKVCache(model.config, max_cache_len=max_cache_len, memory_budget=budget,
                                     residual_length=args.residual_length), "hf_adaptive"
    bits = int(name.removeprefix("adaptive").removesuffix("_per_step"))
    cache = AdaptiveStaticKVCache(model.config, max_cache_len=max_cache_len, fixed_bits=None if bits == 16 else bits,
                                  residual_length=args.residual_length)
    return stop_check_variant(cache, name), "hf_adaptive"


def set_attention(model, impl: str) -> None:
    if impl == "hf_adaptive":
        hf_adaptive.enable_fused_attention(model)
    else:
        model.set_attn_implementation(impl)


@torch.no_grad()
def _fresh(cache_obj, name, model, max_cache_len, context, batch, args):
    """The cache for the next call: compiled caches (the budgeted one included: its budget is set once, as a
    user's would be) are reused through ``reset()``, as static caches are meant to be (same buffers, so no
    re-capture from new addresses); the others are built anew."""
    if name.startswith(REUSED):
        cache_obj.reset()
        return cache_obj
    return make_cache(name, model, max_cache_len, context, batch, args)[0]


def _kv_bytes(cache) -> tuple[int, int]:
    """(live, reserved) KV bytes of any of the caches benchmarked here."""
    if isinstance(cache, AdaptiveKVCache):
        stats = cache.stats()
        return stats["kv_bytes"], stats["reserved_bytes"]
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total, total


class _Config:
    """One configuration's cache, prompt and call factory: ``call_cache()`` is the cache for the next call."""

    def __init__(self, model, name: str, context: int, batch: int, args) -> None:
        self.model, self.name, self.context, self.batch, self.args = model, name, context, batch, args
        self.max_cache_len = args.max_cache_len or context + args.new_tokens + 16
        self.cache, impl = make_cache(name, model, self.max_cache_len, context, batch, args)
        set_attention(model, impl)
        self.ids = prompt(model.config.vocab_size, batch, context, context * 31 + batch, args.device)

    def call_cache(self):
        self.cache = _fresh(self.cache, self.name, self.model, self.max_cache_len, self.context, self.batch, self.args)
        return self.cache

    def warm_up(self) -> None:
        for n in (1, self.args.new_tokens):  # compile and capture both call lengths
            generate_once(self.model, self.ids, self.call_cache(), n, self.args.device)

    def time(self) -> dict:
        return timed_calls(self.model, self.ids, self.call_cache, self.args.new_tokens, self.args.repeats,
                           self.args.device)


def bench_config(model, name: str, context: int, batch: int, args, counter: CaptureCounter | None) -> dict:
    """Warm-up call, ``--repeats`` timed calls, memory, and (compiled caches) the mixed-length calls."""
    config = _Config(model, name, context, batch, args)
    config.warm_up()
    max_cache_len, ids = config.max_cache_len, config.ids
    before = _allocated(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    row = config.time()
    row["stop_check_deferred"] = stop_check_deferred()  # as generate decided in the last timed call
    row["peak_gib"] = (_peak(args.device) - before) / 2**30
    cache = config.cache
    live, reserved = _kv_bytes(cache)
    skips = int(torch._dynamo.utils.counters["inductor"]["cudagraph_skips"])
    row.update(kv_gib=live / 2**30, kv_reserved_gib=reserved / 2**30)
    row["transient_gib"] = row["peak_gib"] - row["kv_reserved_gib"]
    row["cudagraph_skips"] = skips
    if isinstance(cache, AdaptiveStaticKVCache):
        stats = cache.stats()
        row.update(view_changes=stats["view_changes"], host_us_per_step=stats.get("host_us_per_step"),
                   bits_path=_bits_path(cache))
    if args.mixed_calls and counter is not None and name.startswith(REUSED):
        row.update(_mixed_calls(model, name, cache, max_cache_len, context, batch, args, counter))
    if args.profile and name in ("static", "adaptive16", "adaptive4") and (context, batch) == args.profile_at:
        cache = _fresh(cache, name, model, max_cache_len, context, batch, args)
        stem = Path(args.out) / f"profile_{name}_n{context}_b{batch}"
        row["profile"] = profile_call(model, ids, cache, args.new_tokens, args.device, stem)
        cache = _fresh(cache, name, model, max_cache_len, context, batch, args)
        row["host_profile"] = host_profile_call(model, ids, cache, args.new_tokens, args.device, stem)
    return row


def _bits_path(cache: AdaptiveStaticKVCache) -> str:
    path = []
    for h in cache.history:
        if not path or path[-1] != h["bits"]:
            path.append(h["bits"])
    return "->".join(str(b) for b in path)


def _mixed_calls(model, name, cache, max_cache_len, context, batch, args, counter) -> dict:
    """``--mixed-calls`` calls of random prompt length and max_new_tokens under one max_cache_len."""
    rng = random.Random(context + batch)
    graphs0, captures0 = counter.dynamo_graphs(), counter.captures
    ms = []
    for i in range(args.mixed_calls):
        n_new = rng.randint(1, args.new_tokens)
        n_prompt = rng.randint(max(1, context // 2), max_cache_len - n_new - 1)
        cache = _fresh(cache, name, model, max_cache_len, n_prompt, batch, args)
        ids = prompt(model.config.vocab_size, batch, n_prompt, 1000 + i, args.device)
        ms.append(1000 * generate_once(model, ids, cache, n_new, args.device)["wall_s"])
    return {"mixed_recompiles": counter.dynamo_graphs() - graphs0, "mixed_captures": counter.captures - captures0,
            "mixed_call_ms_median": statistics.median(ms)}


def _allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else 0


def _peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0


def tokens_identical_at_16_bits(args) -> dict:
    """Greedy tokens of AdaptiveStaticKVCache at 16 bits vs DynamicCache, on the smallest context of the grid.

    In float32: bf16 rounds differently in every attention kernel (sdpa's and ours sum in other orders), and a
    random-weight model's near-tied logits turn that into other tokens; float32 isolates the cache itself.
    """
    model = build_model(args.shape, args.device, torch.float32)
    context, batch = 64, 1  # float32 sdpa may take its math path: keep the score matrix small
    ids = prompt(model.config.vocab_size, batch, context, 7, args.device)
    set_attention(model, "sdpa")
    ref = generate_once(model, ids, DynamicCache(config=model.config), args.new_tokens, args.device)["tokens"]
    cache, impl = make_cache("adaptive16", model, context + args.new_tokens + 16, context, batch, args)
    set_attention(model, impl)
    got = generate_once(model, ids, cache, args.new_tokens, args.device)["tokens"]
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"context": context, "batch": batch, "new_tokens": args.new_tokens, "dtype": "float32",
            "identical": bool(torch.equal(ref, got)), "matching_fraction": float((ref == got).float().mean())}


def feasible(model, name: str, context: int, batch: int, args) -> str | None:
    """Why a configuration is skipped before it runs (memory), or None."""
    if context * batch > args.max_tokens_in_flight:
        return f"context x batch {context * batch} > --max-tokens-in-flight {args.max_tokens_in_flight}"
    if name in ("dynamic", "static", "static_deferred") and prompt_kv_bytes(model, context, batch) > args.max_kv_gib * 2**30:
        return f"KV {prompt_kv_bytes(model, context, batch) / 2**30:.1f} GiB > --max-kv-gib {args.max_kv_gib}"
    return None


def bench(model, args, on_row=None) -> list[dict]:
    """Every configuration of the grid in turn; ``on_row(rows)`` after each one (the report so far)."""
    counter = CaptureCounter() if args.device.startswith("cuda") else None
    rows, start = [], time.perf_counter()
    grid = [(n, b) for n in args.contexts for b in args.batch_sizes]
    bar = tqdm(total=len(grid) * len(args.caches), desc=f"generate {args.shape}")
    for context, batch in grid:
        for name in args.caches:
            row = {"shape": args.shape, "cache": name, "context": context, "batch": batch}
            bar.set_postfix_str(f"{name} n={context} b={batch}")
            reason = feasible(model, name, context, batch, args)
            if reason is None and time.perf_counter() - start > args.time_budget_s:
                reason = f"--time-budget-s={args.time_budget_s} spent"
            try:
                if reason:
                    raise RuntimeError(reason)
                row.update(bench_config(model, name, context, batch, args, counter))
            except Exception as err:  # noqa: BLE001  (OOM, missing backend: recorded with the reason, grid goes on)
                row["skipped"] = f"{type(err).__name__}: {str(err)[:160]}"
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            bar.update()
    bar.close()
    for r in range(1, args.rounds):  # the grid again, same order: a drift of the machine shows in every cache alike
        for row in rows:
            if "skipped" in row or time.perf_counter() - start > args.time_budget_s:
                continue
            row.setdefault("round_ms", [round(row["decode_ms_per_token"], 4)])
            row["round_ms"].append(round(retime(model, row, args), 4))
            row["decode_ms_per_token"] = statistics.median(row["round_ms"])
        if on_row is not None:
            on_row(rows)
    return rows


def retime(model, row: dict, args) -> float:
    """decode ms/token of one more round of a measured configuration: a fresh cache, a warm-up of both lengths."""
    config = _Config(model, row["cache"], row["context"], row["batch"], args)
    config.warm_up()
    return config.time()["decode_ms_per_token"]


def ratios(rows: list[dict]) -> list[dict]:
    """Per (context, batch): every adaptive cache's ms/token over the baselines measured in this run."""
    out = []
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if "decode_ms_per_token" in r:
            by_key.setdefault((r["shape"], r["context"], r["batch"]), {})[r["cache"]] = r
    for (shape, context, batch), caches in by_key.items():
        line = {"shape": shape, "context": context, "batch": batch}
        for name in ("adaptive16", "adaptive8", "adaptive4"):
            ours = caches.get(name)
            for ref in ("static", "static_deferred", "dynamic", "adaptive16_per_step"):
                if ref == "adaptive16_per_step" and name != "adaptive16":
                    continue
                if ours and ref in caches:
                    line[f"{name}/{ref}"] = ours["decode_ms_per_token"] / caches[ref]["decode_ms_per_token"]
        if "adaptive4" in caches and "adaptive16" in caches:
            line["adaptive4/adaptive16"] = (caches["adaptive4"]["decode_ms_per_token"]
                                            / caches["adaptive16"]["decode_ms_per_token"])
        out.append(line)
    return out


GENERATE_SERIES = [("decode_ms_per_token", "ms / decoded token (model.generate)", True), ("kv_gib", "KV GiB", True)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b", help="random-init Llama shape")
    p.add_argument("--contexts", type=int_list, default=int_list("64,1024,4096,16384,32768,65536"))
    p.add_argument("--batch-sizes", type=int_list, default=int_list("1,8,32"))
    p.add_argument("--caches", default=",".join(CACHES), help=f"comma-separated subset of {CACHES}")
    p.add_argument("--new-tokens", type=int, default=33, help="max_new_tokens of every timed call")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per configuration (median)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time the whole grid this many times, in order (ms/token: the median of the rounds)")
    p.add_argument("--mixed-calls", type=int, default=0, help="calls of mixed lengths per compiled cache")
    p.add_argument("--max-cache-len", type=int, default=0, help="0: context + new tokens + 16 per configuration")
    p.add_argument("--residual-length", type=int, default=64)
    p.add_argument("--max-tokens-in-flight", type=int, default=262144, help="skip context x batch above this")
    p.add_argument("--max-kv-gib", type=float, default=60.0, help="skip bf16 caches whose KV exceeds this")
    p.add_argument("--time-budget-s", type=float, default=500.0, help="stop starting configurations after this")
    p.add_argument("--profile", action="store_true", help="profile one call of static/adaptive16/adaptive4 (torch.profiler, then cProfile)")
    p.add_argument("--profile-at", type=int_list, default=[64, 1], help="context,batch of the profiled calls")
    add_run_arguments(p, "eval/results/kv_generate", "bench_generate")
    args = p.parse_args(argv)
    args.caches = choice_list(p, args.caches, CACHES, "--caches")
    args.profile_at = tuple(args.profile_at)
    if args.rounds < 1 or args.repeats < 1:
        p.error(f"--rounds={args.rounds} and --repeats={args.repeats} must be >= 1")
    return args


COLUMNS = ["shape", "cache", "context", "batch", "decode_ms_per_token", "decode_ms_streamed", "prefill_s", "kv_gib", "kv_reserved_gib",
           "peak_gib", "transient_gib", "view_changes", "host_us_per_step", "bits_path", "mixed_recompiles",
           "mixed_captures", "cudagraph_skips", "round_ms", "skipped"]


def write_results(rows: list[dict], args, card: str, identity: dict, wall_s: float, planned: int) -> None:
    """JSON, Markdown and PNG of the rows so far (rewritten after every configuration, so a run stopped by an outer
    time limit leaves a report of what it measured: ``configurations_done`` against ``configurations_planned``)."""
    env = environment(args.device, card=card, model=f"random-init {args.shape}", dtype=args.dtype,
                      new_tokens=args.new_tokens, repeats=args.repeats, wall_s=round(wall_s, 1),
                      configurations_done=len(rows), configurations_planned=planned)
    ratio_rows = ratios(rows)
    stem = args.name or f"bench_generate_{args.shape}"
    done = max((len(r.get("round_ms", ())) for r in rows), default=0)
    rounds = "" if args.rounds == 1 else (
        f"; --rounds {args.rounds}: the grid timed again in order, each configuration's median round kept (round_ms)"
        if done > 1 else f"; --rounds {args.rounds} asked, but --time-budget-s was spent before a second round")
    notes = (f"Timed through model.generate only ({args.repeats} calls after one warm-up per configuration, "
             f"{args.new_tokens} new tokens{rounds}). Ratios below are measured in this run. Tokens at 16 bits vs "
             f"DynamicCache: {identity}.\n\n" + markdown_table(ratio_rows))
    write_report(args.out, stem, {"rows": rows, "ratios": ratio_rows, "identity_16bit": identity, "args": vars(args)},
                 env, markdown_table(rows, COLUMNS), f"model.generate decode: random-init {args.shape} on {card}",
                 notes)
    plot_by_context(Path(args.out) / f"{stem}.png", [r for r in rows if "decode_ms_per_token" in r],
                    f"model.generate, {args.shape} {args.dtype} on {card}", GENERATE_SERIES)


def main(argv=None) -> None:
    args = parse_args(argv)
    card = prepare_run(args.device)
    t0 = time.perf_counter()
    identity = tokens_identical_at_16_bits(args)
    model = build_model(args.shape, args.device, getattr(torch, args.dtype))
    planned = len(args.contexts) * len(args.batch_sizes) * len(args.caches)
    rows = bench(model, args, lambda rows: write_results(rows, args, card, identity, time.perf_counter() - t0,
                                                         planned))
    write_results(rows, args, card, identity, time.perf_counter() - t0, planned)
    print(markdown_table(rows, COLUMNS))
    print(markdown_table(ratios(rows)))
    print("identity_16bit", identity)


if __name__ == "__main__":
    main()
