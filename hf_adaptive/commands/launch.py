"""`hf-adaptive launch`: start one worker per device through `accelerate launch` and serve with a plan.

Examples:
    hf-adaptive launch --model PATH --gpus 4 --plan auto --trace eval/traces/mixed.jsonl --out runs/mixed
    hf-adaptive launch --model PATH --gpus 2 --cpu --plan tp --http-port 8000 --serve-seconds 60
Anything after ``--`` goes to the worker unchanged (see ``python -m hf_adaptive.parallel.worker -h``).
SIGTERM or Ctrl-C drains in-flight requests (up to --drain-seconds), then stops every worker.
Serving safely (bind address, admin token, limits, metrics): docs/serving.md.
"""

from __future__ import annotations

import argparse
import os

from hf_adaptive.parallel.launch import LaunchConfig, StopTimes, build_launch, check_devices, run_launch


def launch_command_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("launch", help="run the parallel engine on N devices (accelerate launch)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory, embedded model name, or Hub id (org/name)")
    p.add_argument("--gpus", type=int, required=True, help="processes (devices) per machine")
    p.add_argument("--plan", default="auto", help="auto | tp | pp | dp | hybrid | e.g. tp2xpp2")
    p.add_argument("--cpu", action="store_true", help="gloo processes on CPU instead of NCCL on GPUs")
    p.add_argument("--trace", help="JSONL trace to replay")
    p.add_argument("--http-port", type=int, help="serve /generate, /ready, /metrics on --http-host:PORT (0: free)")
    p.add_argument("--http-host", help="HTTP bind address (worker default 127.0.0.1: this machine only)")
    p.add_argument("--serve-seconds", type=float, help="with --http-port: drain and stop after this many seconds")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM/Ctrl-C: queued requests finish within this, then every process is stopped")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (worker default bfloat16)")
    p.add_argument("--out", default="runs/serve", help="directory for the report (rank 0 writes it)")
    p.add_argument("--num_machines", type=int, default=1)
    p.add_argument("--machine_rank", type=int, default=0)
    p.add_argument("--main_process_ip")
    p.add_argument("--main_process_port", type=int, default=0, help="rendezvous port (0: a free one)")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, run nothing")
    p.add_argument("worker_args", nargs=argparse.REMAINDER, help="-- then extra worker arguments")
    p.set_defaults(func=launch_command)
    return p


def _worker_args(args: argparse.Namespace) -> tuple[str, ...]:
    out: list[str] = ["--out", args.out]
    for flag, value in (("--trace", args.trace), ("--http-port", args.http_port), ("--http-host", args.http_host),
                        ("--serve-seconds", args.serve_seconds), ("--drain-seconds", args.drain_seconds),
                        ("--dtype", args.dtype)):
        if value is not None:
            out += [flag, str(value)]
    extra = [a for a in args.worker_args if a != "--"]
    return tuple(out + extra)


def launch_command(args: argparse.Namespace) -> int:
    config = LaunchConfig(model=args.model, gpus=args.gpus, plan=args.plan, cpu=args.cpu,
                          num_machines=args.num_machines, machine_rank=args.machine_rank,
                          main_process_ip=args.main_process_ip, main_process_port=args.main_process_port,
                          worker_args=_worker_args(args))
    cmd, env = build_launch(config, os.environ)
    if args.dry_run:
        changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
        print(" ".join(f"{k}={v}" for k, v in sorted(changed.items())), " ".join(cmd))
        return 0
    import torch

    check_devices(config, torch.cuda.device_count())
    # The launcher waits a little longer than the workers drain, so a clean drain is never cut short.
    return run_launch(cmd, env, stop=StopTimes(drain_s=args.drain_seconds + 10.0))
