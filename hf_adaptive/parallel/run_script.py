"""Run a multi-process script of ours through the package's launcher (``accelerate launch``, a free port).

    python -m hf_adaptive.parallel.run_script --processes 2 eval/parallel_equivalence.py --model PATH --out DIR
    python -m hf_adaptive.parallel.run_script --processes 2 --cpu eval/parallel_equivalence.py ...   # gloo on CPU

Every process gets the environment ``torch.distributed`` reads (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, the
rendezvous), as the parallel workers of ``hf-adaptive launch`` do; ``HF_ADAPTIVE_BACKEND`` says nccl or gloo.
The exit status is the launch's (124 when ``--timeout-s`` ran out).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hf_adaptive.parallel.launch import build_script_launch, run_launch
from hf_adaptive.validation import arg_number


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, launch the script on every process, return the exit status."""
    ap = argparse.ArgumentParser(prog="python -m hf_adaptive.parallel.run_script", description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=arg_number(minimum=1, integer=True), required=True,
                    help="processes on this machine, one per device")
    ap.add_argument("--cpu", action="store_true", help="gloo processes on CPU instead of NCCL on GPUs")
    ap.add_argument("--timeout-s", type=arg_number(minimum=0.0, min_open=True), default=None,
                    help="stop the processes after this many seconds (exit status 124)")
    ap.add_argument("script", help="the Python script every process runs")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    args = ap.parse_args(argv)
    if not Path(args.script).is_file():
        ap.error(f"script: {args.script!r} is not a file; pass the path of the script to run, e.g. "
                 "eval/parallel_equivalence.py")
    cmd, env = build_script_launch(args.script, args.args, args.processes, os.environ, cpu=args.cpu)
    return run_launch(cmd, env, timeout_s=args.timeout_s)


if __name__ == "__main__":
    sys.exit(main())
