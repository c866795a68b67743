"""The parallelism policy's and the batch cap's command-line knobs, shared by the serving worker and
``hf-adaptive simulate``; and the host model's, shared by the multi-process eval scripts.

Contract: argparse in, ``ParallelPolicyConfig`` out (threshold rule; callers swap in the cost-aware rule). One
definition, so a simulated run and a served run with the same flags make the same decisions.
"""

from __future__ import annotations

import argparse
import logging

from hf_adaptive.parallel.capacity import BATCH_CAP_SCOPES
from hf_adaptive.policy.parallel_policy import Band, ParallelPolicyConfig
from hf_adaptive.validation import arg_number

logger = logging.getLogger(__name__)


def add_host_model_arguments(p: argparse.ArgumentParser) -> None:
    """The host copy the engine shards (``worker.load_host_model``): ``--model``, ``--dtype``, ``--random-weights``."""
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--random-weights", action="store_true",
                   help="the model's architecture from config.json with seeded random weights (same on every rank)")


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    """The batch cap (``capacity.replica_rows``): ``--max-batch`` rows per replica or per device."""
    p.add_argument("--max-batch", type=arg_number(minimum=1, integer=True), default=8,
                   help="rows per batch per replica (see --max-batch-per)")
    p.add_argument("--max-batch-per", choices=BATCH_CAP_SCOPES, default="replica",
                   help="the cap's scope: replica (DP over N replicas batches N times the rows TP or PP does) or "
                        "device (per device a replica spans: every plan batches equally many rows)")


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    """Timing, thresholds and the length signal of the parallelism policy."""
    seconds, count = arg_number(minimum=0.0), arg_number(minimum=1, integer=True)
    p.add_argument("--cooldown-s", type=seconds, default=5.0)
    p.add_argument("--min-dwell-s", type=seconds, default=10.0)
    p.add_argument("--confirm-s", type=seconds, default=2.0)
    p.add_argument("--long-context-tokens", type=count, default=1024, help="hybrid enter threshold (exit = 0.75x)")
    p.add_argument("--dp-concurrency", type=count, default=32, help="DP enter threshold (exit = 0.75x)")
    p.add_argument("--dp-short-tokens", type=count, default=256,
                   help="requests (prompt + new tokens) shorter than this count toward --dp-concurrency (exit = 1.25x)")
    fraction = arg_number(minimum=0.1, min_open=True)
    p.add_argument("--hybrid-memory", type=fraction, default=None,
                   help="memory fraction over which the threshold rule picks hybrid TP+PP (exit = this - 0.1); default "
                        "0.8, or 0.05 above the admission ceiling 1 - memory headroom when that is higher: "
                        "admission fills each device up to the ceiling, and a full batch is not memory pressure")
    p.add_argument("--pipeline-memory", type=fraction, default=None,
                   help="memory fraction over which the threshold rule picks PP (exit = this - 0.05); default 0.9, or "
                        "0.05 above --hybrid-memory when that is higher")
    p.add_argument("--queue-head", type=arg_number(minimum=0, integer=True), default=0,
                   help="length signal from the next N queued requests instead of the arrival window (0)")


def memory_bands(args: argparse.Namespace, memory_headroom: float) -> tuple[float, float]:
    """The (hybrid, pipeline) memory-fraction enter thresholds: given, or derived from the admission ceiling."""
    ceiling = 1 - memory_headroom
    hybrid = args.hybrid_memory if args.hybrid_memory is not None else max(0.8, round(ceiling + 0.05, 4))
    pipeline = args.pipeline_memory if args.pipeline_memory is not None else max(0.9, round(hybrid + 0.05, 4))
    for name, value in (("--hybrid-memory", hybrid), ("--pipeline-memory", pipeline)):
        if value <= 0.1:
            raise ValueError(f"{name} must be a memory fraction > 0.1 (e.g. 0.9), got {value}")
    if hybrid < ceiling:
        logger.warning("--hybrid-memory %.2f is below the admission ceiling 1 - memory headroom = %.2f: a full "
                       "batch alone can push the layout to hybrid/PP", hybrid, ceiling)
    return hybrid, pipeline


def policy_config_from_args(args: argparse.Namespace, memory_headroom: float) -> ParallelPolicyConfig:
    """The default-rule policy config those flags describe."""
    hybrid_memory, pipeline_memory = memory_bands(args, memory_headroom)
    if args.dp_short_tokens < 1:
        raise ValueError(f"--dp-short-tokens must be >= 1 (tokens), got {args.dp_short_tokens}; e.g. 256")
    return ParallelPolicyConfig(
        long_context_tokens=Band(args.long_context_tokens, 0.75 * args.long_context_tokens),
        dp_concurrency=Band(args.dp_concurrency, 0.75 * args.dp_concurrency),
        dp_short_tokens=Band(args.dp_short_tokens, 1.25 * args.dp_short_tokens),
        hybrid_memory=Band(hybrid_memory, hybrid_memory - 0.1),
        pipeline_memory=Band(pipeline_memory, pipeline_memory - 0.05),
        cooldown_s=args.cooldown_s, min_dwell_s=args.min_dwell_s, confirm_s=args.confirm_s,
        queue_head_requests=args.queue_head)
