"""Join the process group a launcher prepared, with the rendezvous store on loopback when every rank is local.

Contract: ``DistributedEnv.from_environ`` reads the torchrun environment contract once (what ``accelerate launch``
and ``torchrun`` set: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
TORCHELASTIC_USE_AGENT_STORE); nothing else in the package reads those variables. ``init_distributed`` joins
the group. torch's own TCPStore server listens on every interface whatever MASTER_ADDR says, so where all ranks
share this machine, rank 0 binds the store's socket to 127.0.0.1 itself and hands it over (``master_listen_fd``);
other ranks connect there. Across machines the store must be reachable, and torch's default is kept.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class DistributedEnv:
    """This process's place in the run, as the launcher described it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = LOOPBACK
    master_port: int = 0
    agent_store: bool = False  # torchrun's agent already hosts the store at MASTER_ADDR:MASTER_PORT

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> DistributedEnv:
        """Parse the torchrun variables; a process started alone is rank 0 of 1."""
        world = int(env.get("WORLD_SIZE", 1))
        return cls(rank=int(env.get("RANK", 0)), world_size=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                   local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
                   master_addr=env.get("MASTER_ADDR", LOOPBACK), master_port=int(env.get("MASTER_PORT", 0)),
                   agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "False") == "True")

    @property
    def single_machine(self) -> bool:
        return self.local_world_size == self.world_size or self.master_addr in LOOPBACK_NAMES


def init_distributed(env: Mapping[str, str] | None = None) -> tuple[int, int, torch.device]:
    """Join the process group (NCCL on GPU, gloo on CPU; ``HF_ADAPTIVE_BACKEND`` overrides); returns
    ``(rank, world_size, device)``."""
    env = os.environ if env is None else env
    spec = DistributedEnv.from_environ(env)
    backend = env.get("HF_ADAPTIVE_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", spec.local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    options = {"device_id": device} if device.type == "cuda" else {}
    if spec.world_size == 1:
        options["store"] = dist.HashStore()  # a process alone needs no rendezvous, and opens no port
    elif spec.single_machine and not spec.agent_store:
        options["store"] = loopback_store(spec)
    dist.init_process_group(backend, rank=spec.rank, world_size=spec.world_size, timeout=PROCESS_GROUP_TIMEOUT,
                            **options)
    return dist.get_rank(), dist.get_world_size(), device


def loopback_store(spec: DistributedEnv) -> dist.TCPStore:
    """The run's store on 127.0.0.1:MASTER_PORT: rank 0 serves it from a socket bound to loopback only."""
    if spec.rank != 0:
        return dist.TCPStore(LOOPBACK, spec.master_port, spec.world_size, False, timeout=PROCESS_GROUP_TIMEOUT)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, spec.master_port))
    sock.listen(spec.world_size * 4)
    port = sock.getsockname()[1]
    # detach: the store's server owns the descriptor from here on (a closed Python socket would close it)
    return dist.TCPStore(LOOPBACK, port, spec.world_size, True, timeout=PROCESS_GROUP_TIMEOUT,
                         master_listen_fd=sock.detach(), wait_for_workers=False)
