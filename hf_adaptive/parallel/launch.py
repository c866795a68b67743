"""Build (purely) and run the ``accelerate launch`` command that starts the parallel workers.

Contract: ``build_launch(config, base_env)`` is a pure function returning ``(cmd, env)``; it reads no
global state (the environment comes in as ``base_env``), so it is tested without GPUs. ``run_launch``
is the thin executor. One process per device; on CPU the same torchrun path runs gloo processes.

On one machine nothing listens beyond loopback: the rendezvous goes through a file store (torch's TCP store
would listen on every interface), and the workers' own store is bound to 127.0.0.1 (``rendezvous.py``).
Port 0 (the default) lets accelerate pick a free port. SIGTERM or SIGINT to the launcher is passed to the
workers, which drain (``worker.py``); whatever is still running ``drain_s + grace_s`` later is killed, down
to the last descendant, so no process outlives the launch.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil

from hf_adaptive.models import looks_like_hub_id
from hf_adaptive.parallel.plans import ParallelPlan

logger = logging.getLogger(__name__)

PLAN_CHOICES: tuple[str, ...] = ("auto", "tp", "pp", "dp", "hybrid")

# NVLink SHARP multicast and symmetric-memory multicast are unavailable on the lent machines; NCCL must
# not try them. OMP threads: one per process unless the caller set it.
FIXED_ENV: dict[str, str] = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
# One machine: the agent rendezvouses through a file, hosts no TCP store, and gloo talks over loopback.
SINGLE_MACHINE_ENV: dict[str, str] = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "GLOO_SOCKET_IFNAME": "lo"}


@dataclass(frozen=True)
class LaunchConfig:
    """What to launch and where.

    Args:
        model: checkpoint directory, embedded model name, or Hugging Face Hub id (``org/name``; the workers may
            then reach the Hub, every other model runs with ``HF_HUB_OFFLINE=1`` unless the caller set it).
        gpus: processes (devices) per machine.
        plan: ``auto`` (the adaptive policy) or a fixed strategy, or a plan name such as ``tp2xpp2``.
        cpu: run gloo processes on CPU instead of NCCL on GPUs.
        num_machines / machine_rank / main_process_ip / main_process_port: multi-node rendezvous; port 0 (the
            default) lets accelerate pick a free port.
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
    main_process_port: int = 0
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
        if not 0 <= self.main_process_port < 2**16:
            raise ValueError(f"main_process_port must be in [0, 65535] (0: a free port), got {self.main_process_port}")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("main_process_ip is required when num_machines > 1; pass the IP of machine rank 0")

    @property
    def world_size(self) -> int:
        return self.gpus * self.num_machines


def check_devices(config: LaunchConfig, cuda_devices: int) -> None:
    """Refuse a GPU launch this host cannot run (``cuda_devices``: ``torch.cuda.device_count()``), before any
    process starts."""
    if config.cpu:
        return
    if cuda_devices == 0:
        raise ValueError(f"--gpus {config.gpus} starts one process per CUDA device, but this host has none "
                         "(torch.cuda.device_count() is 0: no GPU, or a CPU-only torch build); add --cpu to run "
                         "gloo processes on CPU")
    if config.gpus > cuda_devices:
        raise ValueError(f"--gpus {config.gpus} exceeds the {cuda_devices} CUDA device(s) of this host; pass "
                         f"--gpus {cuda_devices} or fewer")


def _accelerate(config: LaunchConfig, base_env: Mapping[str, str], hub: bool) -> tuple[list[str], dict[str, str]]:
    """``accelerate launch`` and its options for ``config`` (up to the program it starts), and the environment
    (``hub``: the processes may reach the Hugging Face Hub; otherwise ``HF_HUB_OFFLINE=1`` unless already set)."""
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
    elif config.world_size > 1:
        cmd += ["--rdzv_backend", "c10d", "--rdzv_conf", "store_type=file"]
    cmd += ["--main_process_port", str(config.main_process_port)]
    env = dict(base_env)
    env.update(FIXED_ENV)
    if not hub:
        env.setdefault("HF_HUB_OFFLINE", "1")
    if config.num_machines == 1:
        env.update(SINGLE_MACHINE_ENV)
    env["HF_ADAPTIVE_BACKEND"] = "gloo" if config.cpu else "nccl"
    if config.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    return cmd, env


def build_launch(config: LaunchConfig, base_env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` command line and environment for ``config``. Pure."""
    cmd, env = _accelerate(config, base_env, hub=looks_like_hub_id(config.model))
    cmd += ["-m", "hf_adaptive.parallel.worker", "--model", config.model, "--plan", config.plan]
    return cmd + list(config.worker_args), env


def build_script_launch(script: str, script_args: Sequence[str], processes: int, base_env: Mapping[str, str], *,
                        cpu: bool = False, python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    """The same launcher for a script of ours (``eval/parallel_equivalence.py``, ``eval/bench_reshard.py``): one
    process per device on this machine, a free port, the same environment as the workers (offline unless the
    caller's environment says otherwise). Pure.

    Args:
        script: path of the Python script every process runs.
        script_args: its arguments.
        processes: processes (devices) on this machine.
        base_env: the environment to start from (``os.environ``).
        cpu: gloo processes on CPU instead of NCCL on GPUs.
        python: the interpreter that runs accelerate.
    """
    config = LaunchConfig(model=script, gpus=processes, cpu=cpu, python=python)
    cmd, env = _accelerate(config, base_env, hub=False)
    return cmd + [script, *script_args], env


@dataclass(frozen=True)
class StopTimes:
    """How a launch is stopped. ``drain_s``: after the first SIGTERM/SIGINT (or the timeout), how long the
    workers may drain and exit; ``grace_s``: after SIGTERM to what is left, how long before SIGKILL."""

    drain_s: float = 40.0
    grace_s: float = 10.0


def run_launch(cmd: list[str], env: dict[str, str], timeout_s: float | None = None,
               stop: StopTimes = StopTimes()) -> int:
    """Run the launch command; returns its exit status (124 when ``timeout_s`` ran out).

    SIGTERM and SIGINT to this process start a drain: the workers get SIGTERM (rank 0 finishes what is queued,
    all ranks exit); a second signal, or ``stop.drain_s`` without an exit, ends it by force. Every descendant
    ever seen is gone when this returns."""
    logger.info("launching: %s", " ".join(cmd))
    # Own session: a Ctrl-C in the terminal reaches only this process, which then stops the workers in order.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    tree = ProcessTree(proc.pid)
    requests: list[int] = []
    with _signals_recorded(requests):
        started = time.monotonic()
        while proc.poll() is None and not requests:
            tree.refresh()
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                logger.error("launch exceeded %.0f s; stopping it: %s", timeout_s, " ".join(cmd))
                requests.append(0)
                break
            time.sleep(0.1)
        if requests:
            _drain_then_kill(proc, tree, requests, stop)
    rc = proc.wait()
    tree.kill_all(stop.grace_s)  # leftovers of a clean exit too (a worker that outlived its agent)
    return 124 if requests and requests[0] == 0 else rc


def _drain_then_kill(proc: subprocess.Popen, tree: ProcessTree, requests: list[int], stop: StopTimes) -> None:
    logger.warning("stopping: workers drain for up to %.0f s (signal again to kill now)", stop.drain_s)
    tree.refresh()
    tree.signal_workers(signal.SIGTERM)
    deadline = time.monotonic() + stop.drain_s
    seen = len(requests)
    while proc.poll() is None and time.monotonic() < deadline and len(requests) == seen:
        tree.refresh()
        time.sleep(0.1)
    if proc.poll() is None:
        logger.error("launch still running after the drain; terminating it")
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=stop.grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)


class ProcessTree:
    """Every process ever seen below ``root`` (workers of torchrun run in sessions of their own, and are
    re-parented once their agent dies, so they are remembered while the tree can still be walked)."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.seen: dict[int, psutil.Process] = {}

    def refresh(self) -> None:
        try:
            children = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            self.seen.setdefault(child.pid, child)

    def alive(self) -> list[psutil.Process]:
        """Seen processes still running (``is_running`` also guards against a reused pid)."""
        out = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                continue
        return out

    def signal_workers(self, sig: int) -> None:
        for p in self.alive():
            _send(p, sig)

    def kill_all(self, grace_s: float) -> None:
        """SIGTERM every seen process still alive, then SIGKILL those left after ``grace_s``."""
        left = self.alive()
        if not left:
            return
        logger.warning("stopping %d process(es) left behind: %s", len(left), [p.pid for p in left])
        for p in left:
            _send(p, signal.SIGTERM)
        _, still = psutil.wait_procs(left, timeout=grace_s)
        for p in still:
            _send(p, signal.SIGKILL)
        psutil.wait_procs(still, timeout=grace_s)


def _send(process: psutil.Process, sig: int) -> None:
    try:
        process.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def _signals_recorded(requests: list[int]) -> Iterator[None]:
    """While inside: SIGTERM and SIGINT append their number to ``requests`` instead of ending the process
    (only the main thread can install handlers; elsewhere the defaults stay)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, _frame: requests.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
