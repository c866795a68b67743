"""Cost of a precision switch on the compiled path: per-step decode time of AdaptiveStaticKVCache while pressure
steps 16 → 8 → 4 bits; a pool appearing or being released changes the view (the CUDA graph is re-captured, the
step is not re-traced: the view's signature is fixed, its pool extents dynamic).

One command (GPU, ~1-2 minutes on one H100):
    python eval/bench_static_switch.py --out results/static_switch   (eval/gpu/run.sh kv static-switch)
CPU smoke:
    python eval/bench_static_switch.py --device cpu --dtype float32 --shape tiny --context 256 --steps 60 --out /tmp/sw

A random-init Llama of ``--shape`` is prefilled with ``--context`` tokens (eager), then decoded greedily through
``model.get_compiled_call`` (transformers' compiled step: inductor, CUDA graphs) for ``--steps`` steps with a
scripted pressure that enters the 8-bit rung at ``--switch-at`` and the 4-bit rung 4 block-lengths later.
Reports every step's wall time, the steps where the cache's view changed and where dynamo compiled a graph
(``torch._dynamo.utils.counters``), and the switch cost = time of those steps minus the median step.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import SHAPES, environment, prefill, random_llama, sync  # first: sets the offline default
import torch
from tqdm import tqdm

import hf_adaptive
from hf_adaptive.compat import forward_cache_kwargs
from hf_adaptive.evaluation.report import markdown_table, write_report
from hf_adaptive.kv.pressure import ScriptedPressure
from hf_adaptive.kv.static import AdaptiveStaticKVCache


@torch.no_grad()
def run(model, args) -> list[dict]:
    """Per-step rows: step, ms, bits of the step, whether the view changed, graphs compiled so far."""
    states, token = prefill(model, args.context, args.batch, args.device)
    eight, four = args.switch_at, args.switch_at + 4 * args.block_size
    fractions = [0.0] * (eight + 1) + [0.75] * (four - eight) + [0.9] * (args.steps + 2)
    cache = AdaptiveStaticKVCache(model.config, max_cache_len=args.context + args.steps + 2,
                                  pressure=ScriptedPressure(fractions), residual_length=args.block_size,
                                  block_size=args.block_size)
    for i, (k, v) in enumerate(states):
        cache.update(k, v, i)
    hf_adaptive.enable_fused_attention(model)
    step = model.get_compiled_call(None)
    kwargs = forward_cache_kwargs(model, cache)
    rows = []
    for i in tqdm(range(args.steps), desc="decode"):
        before, graphs_before = cache.view_changes, _graphs()
        sync(args.device)
        t0 = time.perf_counter()
        token = step(input_ids=token, use_cache=True, **kwargs).logits[:, -1:].argmax(-1)
        sync(args.device)
        rows.append({"step": i, "ms": 1000 * (time.perf_counter() - t0), "bits": cache.history[-1]["bits"],
                     "view_changed": cache.view_changes > before, "compiled": _graphs() > graphs_before,
                     "graphs": _graphs()})
    return rows


def _graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def summarize(rows: list[dict], warmup: int) -> dict:
    steady = [r["ms"] for r in rows[warmup:] if not (r["view_changed"] or r["compiled"])]
    median = statistics.median(steady)
    switches = [{"step": r["step"], "bits": r["bits"], "ms": r["ms"], "cost_ms": r["ms"] - median,
                 "compiled": r["compiled"]} for r in rows[warmup:] if r["view_changed"] or r["compiled"]]
    by_bits = {b: statistics.median([r["ms"] for r in rows[warmup:] if r["bits"] == b and not r["view_changed"]])
               for b in sorted({r["bits"] for r in rows[warmup:]}, reverse=True)}
    slowest = sorted(rows[warmup:], key=lambda r: r["ms"], reverse=True)[:6]  # outliers with no switch show too
    return {"median_step_ms": median, "median_step_ms_by_bits": by_bits, "switches": switches,
            "slowest_steps": [{k: r[k] for k in ("step", "bits", "ms", "view_changed", "compiled")} for r in slowest],
            "graphs_compiled_after_warmup": rows[-1]["graphs"] - rows[warmup - 1]["graphs"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--switch-at", type=int, default=120, help="decode step entering the 8-bit rung")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=20, help="first steps excluded from the median (compile, capture)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # it re-plans per key length (see bench_kv_e2e.py)
    model = random_llama(args.shape, args.device, args.dtype)
    hf_adaptive.register_attention()
    rows = run(model, args)
    summary = summarize(rows, args.warmup)
    env = environment(args.device, model=f"random-init {args.shape}", dtype=args.dtype, context=args.context,
                      batch=args.batch, **summary)
    card = env["card"]
    table = markdown_table(summary["switches"], ["step", "bits", "ms", "cost_ms", "compiled"])
    notes = (f"Median decode step {summary['median_step_ms']:.3f} ms (steps after {args.warmup}, switch steps "
             f"excluded); by bits {summary['median_step_ms_by_bits']}. Each row: a step where the cache's view changed "
             "(a new precision's pool appeared or a pool was released: the CUDA graph is re-captured) or dynamo "
             "compiled a graph (`compiled`); cost_ms = its time minus the median. Graphs compiled after the warm-up: "
             f"{summary['graphs_compiled_after_warmup']}. Slowest steps: {summary['slowest_steps']}. "
             "Per-step times are in the JSON.")
    write_report(args.out, "static_switch", {"rows": rows, "summary": summary, "args": vars(args)}, env, table,
                 f"Precision switch cost on the compiled path ({card})", notes)
    print(table)
    print(notes)


if __name__ == "__main__":
    main()
