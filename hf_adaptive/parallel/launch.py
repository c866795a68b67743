"""Build (purely) and run the ``accelerate launch`` command that starts the parallel workers.

Contract: ``build_launch(config, base_env)`` is a pure function returning ``(cmd, env)``; it reads no
global state (the environment comes in as ``base_env``), so it is tested without GPUs. ``run_launch``
is the thin executor. One process per device; on CPU the same torchrun path runs gloo processes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from hf_adaptive.parallel.plans import ParallelPlan

logger = logging.getLogger(__name__)

PLAN_CHOICES: tuple[str, ...] = ("auto", "tp", "pp", "dp", "hybrid")

# NVLink SHARP multicast and symmetric-memory multicast are unavailable on the lent machines; NCCL must
# not try them. OMP threads: one per process unless the caller set it.
FIXED_ENV: dict[str, str] = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                             "HF_HUB_OFFLINE": "1"}


@dataclass(frozen=True)
class LaunchConfig:
    """What to launch and where.

    Args:
        model: checkpoint directory or embedded model name.
        gpus: processes (devices) per machine.
        plan: ``auto`` (the adaptive policy) or a fixed strategy, or a plan name such as ``tp2xpp2``.
        cpu: run gloo processes on CPU instead of NCCL on GPUs.
        num_machines / machine_rank / main_process_ip / main_process_port: multi-node rendezvous.
        worker_args: extra arguments for ``hf_adaptive.parallel.worker`` (trace, http port, out, ...).
        python: the interpreter that runs accelerate.
    """

    model: str
    gpus: int
    plan: str = "auto"
    cpu: bool = False
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int = 29500
    worker_args: tuple[str, ...] = ()
    python: str = field(default=sys.executable)

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"gpus must be >= 1 (processes per machine), got {self.gpus}")
        if self.plan not in PLAN_CHOICES:
            try:
                ParallelPlan.parse(self.plan)
            except ValueError:
                raise ValueError(f"plan must be one of {PLAN_CHOICES} or a plan name like 'tp2xpp2', "
                                 f"got {self.plan!r}") from None
        if self.num_machines < 1 or not 0 <= self.machine_rank < self.num_machines:
            raise ValueError(f"machine_rank must be in [0, num_machines={self.num_machines}), got "
                             f"{self.machine_rank}")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("main_process_ip is required when num_machines > 1; pass the IP of machine rank 0")

    @property
    def world_size(self) -> int:
        return self.gpus * self.num_machines


def build_launch(config: LaunchConfig, base_env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` command line and environment for ``config``. Pure."""
    cmd = [config.python, "-m", "accelerate.commands.launch"]
    if config.world_size > 1:
        # --multi_gpu selects accelerate's torchrun launcher, which is also the only one that starts several
        # local processes without MPI; on CPU the worker then picks gloo (accelerate's --cpu would start one).
        cmd.append("--multi_gpu")
    cmd += ["--num_processes", str(config.world_size), "--num_machines", str(config.num_machines),
            "--mixed_precision", "no", "--dynamo_backend", "no"]
    if config.num_machines > 1:
        cmd += ["--machine_rank", str(config.machine_rank), "--main_process_ip", config.main_process_ip,
                "--same_network"]
    cmd += ["--main_process_port", str(config.main_process_port)]
    cmd += ["-m", "hf_adaptive.parallel.worker", "--model", config.model, "--plan", config.plan]
    cmd += list(config.worker_args)
    env = dict(base_env)
    env.update(FIXED_ENV)
    env["HF_ADAPTIVE_BACKEND"] = "gloo" if config.cpu else "nccl"
    if config.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    return cmd, env


def run_launch(cmd: list[str], env: dict[str, str], timeout_s: float | None = None) -> int:
    """Run the launch command; returns its exit status (124 when ``timeout_s`` ran out and it was killed)."""
    logger.info("launching: %s", " ".join(cmd))
    # Own process group: on a timeout the launcher's workers (which hold the GPUs and the rendezvous port) go too.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # SIGTERM first: torchrun's agent then stops its workers, which run in sessions of their own (a SIGKILL
        # of the launcher's group alone left them serving on the GPUs); SIGKILL whatever is left after a grace.
        logger.error("launch exceeded %.0f s; stopping it: %s", timeout_s, " ".join(cmd))
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return 124
