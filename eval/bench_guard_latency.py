"""Dynamo's guards on generate's compiled decode step: how many, and what checking them costs per step.

Before every compiled decode step, dynamo checks the guards of its cached graphs (shapes, module attributes, the
tier selector...) on the host. The GPU waits for that check once per step: on the Llama-3.1-8B shape the profile of
compiled ``generate`` shows about 1.6 ms of "TorchDynamo Cache Lookup" per step against 6.4 ms of device time
(``precision_generate_h100/score_fallback_profile``). This script measures the guard set of the decode step for
the plain model and for the same model after ``prepare_tiers`` (the tiered linears, their formats and fused
groups), with an open ``PrecisionController`` that never switches, and with the tiers switched at every step
(``tiers+alternating``: one graph per tier, a step's tier never the previous step's):

- ``guards``: guard lines dynamo logs for the compiled step (its "guards" log artifact), all cache entries;
- ``guard_eval_us``: the latency dynamo measures when it builds each entry's guard check (its own figure);
- ``lookup_us_per_step``: torch.profiler's "TorchDynamo Cache Lookup" per decode step, the median (and the least)
  of ``--repeats`` profiled calls.

Guard counts do not depend on the device or the backend (compiled with dynamo's eager backend here, on CPU, so no
code is generated); the latencies are this host's and only comparable within one run.

    python eval/bench_guard_latency.py --layers 32 --out eval/results/precision_guards_cpu
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
from pathlib import Path

from _common import environment  # first: sets the offline default
from _generate_timing import SHAPES, choice_list, prompt

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

from hf_adaptive.compat import generate_cache_kwargs  # noqa: E402
from hf_adaptive.evaluation.report import markdown_table, write_report  # noqa: E402
from hf_adaptive.precision.controller import PrecisionController, default_policy_config  # noqa: E402
from hf_adaptive.precision.tiers import prepare_tiers  # noqa: E402
from hf_adaptive.validation import arg_number  # noqa: E402

VARIANTS = ("plain", "tiers", "tiers+controller", "tiers+alternating")
LATENCY = re.compile(r"Guard eval latency = ([0-9.]+) us")


class _GuardLog(logging.Handler):
    """Collects dynamo's "guards" log artifact: its lines and the guard eval latencies it reports."""

    def __init__(self) -> None:
        super().__init__()
        self.lines = 0
        self.latencies: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        self.lines += text.count("\n") + 1
        self.latencies += [float(x) for x in LATENCY.findall(text)]


class _Alternate:
    """A logits processor that switches the tiers every step (int4, native, int4, ...), as a controller's decision
    does, without scoring: the guard checks of a step whose tier is not the last compiled graph's."""

    def __init__(self, tiers) -> None:
        self.tiers = tiers

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.tiers.set(self.tiers.fast if self.tiers.active == self.tiers.top else self.tiers.top)
        return scores


def _model(layers: int, variant: str, lean: bool):
    torch.manual_seed(0)
    config = LlamaConfig(**{**SHAPES["tiny"], "num_hidden_layers": layers})
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    tiers = prepare_tiers(model, tiers=("int4", "native"), lean_guards=lean) if variant != "plain" else None
    return model, tiers


def measure(variant: str, layers: int, new_tokens: int, repeats: int = 5, lean: bool = True) -> dict:
    """One variant in a fresh dynamo state: the guards its compiled step got, then ``repeats`` profiled calls.
    ``lean``: ``prepare_tiers(lean_guards=...)``, the tiered linears' fixed attributes left unguarded or not."""
    torch._dynamo.reset()
    model, tiers = _model(layers, variant, lean)
    ids = prompt(model.config.vocab_size, 1, 16, 0, "cpu")
    compile_config = CompileConfig(backend="eager")
    compile_config._compile_all_devices = True  # generate compiles on accelerators only unless told
    cache = StaticCache(config=model.config, max_cache_len=16 + new_tokens + 8)

    def call():
        cache.reset()
        controller = None
        if variant == "tiers+controller":  # never switches: the guards of the tier and the score, not a switch
            controller = PrecisionController(tiers, default_policy_config(tiers, high=1.0, low=0.0))
        kwargs = {"logits_processor": [controller]} if controller else {}
        if variant == "tiers+alternating":
            kwargs = {"logits_processor": [_Alternate(tiers)]}
        try:
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, compile_config=compile_config,
                           **generate_cache_kwargs(cache), **kwargs)
        finally:
            if controller is not None:
                controller.close()
            if tiers is not None:
                tiers.set(tiers.top)

    log = _GuardLog()
    logger = logging.getLogger("torch._dynamo.guards")
    logger.addHandler(log)
    torch._logging.set_logs(guards=True)
    try:
        call()  # compiles: dynamo logs every guard it installs
    finally:
        torch._logging.set_logs()
        logger.removeHandler(log)
    from torch.profiler import ProfilerActivity, profile

    per_call = []
    for _ in range(repeats):  # a shared host's load comes and goes: the median and the least of several calls
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        lookups = [e for e in prof.key_averages() if e.key == "TorchDynamo Cache Lookup"]
        if lookups and lookups[0].count:
            per_call.append(lookups[0].cpu_time_total / lookups[0].count)
    return {"variant": variant, "guard_set": "plain model" if tiers is None else "lean" if tiers.lean_guards else "full",
            "layers": layers, "guards": log.lines,
            "guard_eval_us": round(statistics.median(log.latencies), 1) if log.latencies else None,
            "cache_entries": len(log.latencies),
            "lookup_us_per_step": round(statistics.median(per_call), 1) if per_call else None,
            "lookup_us_per_step_min": round(min(per_call), 1) if per_call else None}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=arg_number(minimum=1, integer=True), default=32,
                   help="decoder layers of the tiny-width Llama (guards grow with layers, not with width)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--guard-sets", default="lean,full",
                   help="the tier variants under prepare_tiers(lean_guards=True) ('lean'), dynamo's full set ('full')")
    p.add_argument("--new-tokens", type=arg_number(minimum=2, integer=True), default=33)
    p.add_argument("--repeats", type=arg_number(minimum=1, integer=True), default=5, help="profiled calls per variant")
    p.add_argument("--name", default="guard_latency")
    p.add_argument("--out", default="eval/results/precision_guards_cpu")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.guard_sets = choice_list(p, args.guard_sets, ("lean", "full"), "--guard-sets")
    bad = sorted(set(args.variants) - set(VARIANTS))
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {VARIANTS}")
    return args


COLUMNS = ["variant", "guard_set", "layers", "guards", "cache_entries", "guard_eval_us", "lookup_us_per_step",
           "lookup_us_per_step_min"]


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = [(v, g == "lean") for v in args.variants for g in (args.guard_sets if v != "plain" else ["lean"])]
    rows = [measure(v, args.layers, args.new_tokens, args.repeats, lean) for v, lean in tqdm(runs, desc="guards")]
    env = environment("cpu", model=f"random-init Llama, tiny width, {args.layers} layers", backend="eager",
                      new_tokens=args.new_tokens)
    write_report(args.out, args.name, {"rows": rows, "args": vars(args)}, env, markdown_table(rows, COLUMNS),
                 "Dynamo guards of generate's compiled decode step",
                 notes="`guards`: guard lines dynamo logged for the compiled step (every cache entry); "
                       "`guard_eval_us`: dynamo's own measure of one entry's check (median over entries); "
                       "`lookup_us_per_step`: the profiler's cache lookup per decode step, median (and least) of the "
                       "profiled calls. Latencies are this host's.")
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
