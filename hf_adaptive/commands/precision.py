"""`hf-adaptive precision "prompt"`: generate with token-level precision switching and report it.

``--mode lossy`` (default) runs ``model.generate`` with a ``PrecisionController`` (greedy or sampled);
``--mode graph`` runs greedy lossy decoding on the graph engine with the controller's decision inside
each captured step (``FusedStepDecoder``; decodes exactly ``--max-new-tokens``, no EOS stop);
``--mode verified`` runs the lossless draft (int4) / verify (top tier) decoder on the graph engine (CUDA
graphs on a GPU, eager on CPU); ``--mode cascade`` runs the lossless draft cascade inside ``model.generate``
(prompt lookup and the int4 self-draft, which ends at its own first doubt: ``--self-stop``), token-identical to
greedy decoding. Prints the text and the telemetry (tier usage, switches, confidence accuracy; for the cascade,
rounds and acceptance per drafter); ``--json`` writes the full report and ``--plot`` a PNG (not for the cascade,
whose report is per round). Works offline on the embedded model.
"""

from __future__ import annotations

import argparse
import json

from hf_adaptive.commands.common import (
    add_generation_arguments,
    chat_inputs,
    load_for_command,
    sampling_kwargs,
    wall_clock,
)
from hf_adaptive.validation import arg_number

DEFAULT_PROMPT = "Write a haiku about autumn leaves."


def precision_command_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("precision", help="generate with confidence-driven precision switching",
                                   description=__doc__.splitlines()[0])
    add_generation_arguments(parser, DEFAULT_PROMPT, max_new_tokens=64,
                             sample_help="lossy mode: sample (temperature 0.7)",
                             json_help="write the telemetry report here")
    parser.add_argument("--mode", default="lossy", choices=("lossy", "graph", "verified", "cascade"))
    parser.add_argument("--tiers", default=None,
                        help="comma list from int4,fp8,native,fp32 (default int4,native on CUDA, int4,fp32 on CPU)")
    parser.add_argument("--int4-kernel", default="auto", choices=("auto", "triton", "tinygemm"),
                        help="CUDA int4 kernel (auto = tinygemm, the fastest at one row; triton: ours)")
    parser.add_argument("--max-draft", type=arg_number(minimum=1, integer=True), default=None,
                        help="verified and cascade modes: most tokens an int4 draft proposes per round (default 4 "
                             "in verified mode; 8 in cascade mode, whose drafts end at their own first doubt)")
    parser.add_argument("--self-stop", type=arg_number(minimum=0.0, maximum=1.0, min_open=True, max_open=True),
                        default=0.7, help="cascade mode: end an int4 draft after its first token whose own p_max is "
                                          "below this (DraftPolicyConfig.self_stop)")
    parser.add_argument("--plot", default=None, help="write the telemetry PNG here")
    parser.set_defaults(func=precision_command)
    return parser


def precision_command(args: argparse.Namespace) -> int:
    from hf_adaptive.precision.tiers import TIER_RANK, prepare_tiers

    if args.mode in ("graph", "cascade") and args.sample:
        raise ValueError(f"--mode {args.mode} decodes greedily; got --sample. Fix: drop --sample or use --mode lossy")
    if args.mode == "cascade" and args.plot:
        raise ValueError("--plot draws the tier timeline of the lossy, graph and verified modes; the cascade's "
                         "report is per round. Fix: drop --plot, or use --json for the cascade's rounds")
    names = tuple(t.strip() for t in args.tiers.split(",")) if args.tiers else None
    if names is not None and (not names or any(t not in TIER_RANK for t in names)):
        raise ValueError(f"--tiers must be a comma list from {','.join(TIER_RANK)}; got {args.tiers!r}. "
                         "Fix: e.g. --tiers int4,native")
    model, tokenizer = load_for_command(args)
    default = ("int4", "native") if model.device.type == "cuda" else ("int4", "fp32")
    tiers = prepare_tiers(model, tiers=names or default, int4_kernel=args.int4_kernel)
    ids = chat_inputs(tokenizer, args.prompt)["input_ids"].to(model.device)
    run = {"lossy": _run_lossy, "graph": _run_graph, "verified": _run_verified, "cascade": _run_cascade}[args.mode]
    with wall_clock(model.device) as clock:
        tokens, telemetry = run(tiers, ids, args)
    seconds = clock["seconds"]
    print(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    report = telemetry.report()
    if args.mode == "cascade":
        drafters = ", ".join(f"{name} {d['accepted']}/{d['proposed']} accepted" for name, d in
                             report["drafters"].items() if d["proposed"])
        print(f"\n{len(tokens)} tokens in {seconds:.2f} s; {report['verify_forwards']} top-tier forwards "
              f"({report['tokens_per_verify']:.2f} tokens each); drafts: {drafters or 'none'}")
    else:
        print(f"\n{len(tokens)} tokens in {seconds:.2f} s; tiers {report['tier_fraction']}, "
              f"{report['switches']} switches, tier weight bytes {tiers.memory_bytes()}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        telemetry.plot(args.plot, title=f"precision switching ({args.mode})")
    return 0


def _run_lossy(tiers, ids, args):
    import torch

    from hf_adaptive.precision.controller import PrecisionController

    with torch.inference_mode(), PrecisionController(tiers) as ctl:
        out = tiers.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                   logits_processor=[ctl], **sampling_kwargs(args.sample))
    return out[0, ids.shape[1]:], ctl.telemetry


def _run_graph(tiers, ids, args):
    from hf_adaptive.precision.controller import PrecisionController
    from hf_adaptive.precision.fused_decode import FusedStepDecoder, decision_for
    from hf_adaptive.precision.graph_decode import GraphDecodeConfig, GraphDecodeEngine
    from hf_adaptive.precision.options import DecodeOptions

    with PrecisionController(tiers, read_raw_logits=False) as ctl:
        engine = GraphDecodeEngine(tiers, GraphDecodeConfig(max_len=ids.shape[1] + args.max_new_tokens + 8))
        decoder = FusedStepDecoder(engine, decision_for(ctl), capacity=args.max_new_tokens)
        out = decoder.generate(ids, DecodeOptions(max_new_tokens=args.max_new_tokens, controller=ctl,
                                                  decision_lag=1))
    return out[0], ctl.telemetry


def _run_verified(tiers, ids, args):
    from hf_adaptive.precision.controller import default_policy_config
    from hf_adaptive.precision.graph_decode import GraphDecodeConfig, GraphDecodeEngine
    from hf_adaptive.precision.options import DecodeOptions, DraftOptions
    from hf_adaptive.precision.verified import generate_verified

    max_draft = args.max_draft or 4
    cfg = GraphDecodeConfig(max_len=ids.shape[1] + args.max_new_tokens + max_draft + 8, verify_len=max_draft + 1)
    draft = DraftOptions(max_draft=max_draft, policy=default_policy_config(tiers))
    opts = DecodeOptions(max_new_tokens=args.max_new_tokens, draft=draft)
    out = generate_verified(GraphDecodeEngine(tiers, cfg), ids, opts)
    return out[0], draft.telemetry


def _run_cascade(tiers, ids, args):
    import torch

    from hf_adaptive.policy.draft_policy import DraftPolicyConfig
    from hf_adaptive.precision.cascade import cascade_decoding
    from hf_adaptive.precision.drafting import CascadeCandidateGenerator

    config = DraftPolicyConfig(max_self_draft=args.max_draft or 8, self_stop=args.self_stop)
    gen = CascadeCandidateGenerator(tiers, config)
    cache = {}
    if ids.is_cuda:  # a StaticCache with room for the last round's verify: compiled rounds at fixed widths
        from transformers import StaticCache

        from hf_adaptive.compat import generate_cache_kwargs

        room = ids.shape[1] + args.max_new_tokens + gen.num_drafting_tokens + 1
        cache = generate_cache_kwargs(StaticCache(config=tiers.model.config, max_cache_len=room))
    with torch.inference_mode():
        out = tiers.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                   do_sample=False, custom_generate=cascade_decoding, candidate_generator=gen,
                                   **cache)
    return out[0, ids.shape[1]:], gen.telemetry
