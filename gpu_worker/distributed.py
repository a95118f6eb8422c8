"""The worker's tensor-parallel process group: where the ranks meet, which backend joins them, and the
checks that run before any of it.

Each worker process is one rank. The ranks meet through torch.distributed's rendezvous (``init_method``):
by default derived from the scheduler address that every rank already has, so launchers pass nothing more:

    ipc:///DIR/NAME           -> file:///DIR/torch-dist-init   (a file beside the socket)
    tcp://HOST:PORT           -> tcp://HOST:PORT+1              (rank 0 listens on PORT+1)

The tcp form assumes rank 0 runs on HOST (the scheduler and the workers of one engine share a host or a
pod); otherwise pass ``--dist-init-method``. A file rendezvous must not reuse a file left by an earlier
group: the launchers put it in a fresh temporary directory.

NCCL joins GPU ranks, gloo CPU ranks (the same code, tested without a GPU). One rank makes no process
group at all. NVLink multicast (NVLS) stays off: ``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``
and ``NVSHMEM_DISABLE_NVLS=1`` are set, unless already set, before NCCL starts. On shared multi-GPU hosts
(the H200 machines our GPU runs use) a program that creates NVLink multicast objects can put the host's
GPUs out of service for everyone; plain NCCL all-reduce over NVLink does not need them.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from gpu_worker.model_config import ModelConfig
from gpu_worker.models import get_model_class
from gpu_worker.models.parallel import SINGLE, TPGroup

NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
INIT_FILE_NAME = "torch-dist-init"


def default_init_method(scheduler_address: str) -> str:
    """The rendezvous address derived from the scheduler's worker address (module docstring)."""
    if scheduler_address.startswith("ipc://"):
        directory = os.path.dirname(scheduler_address.removeprefix("ipc://"))
        return f"file://{os.path.join(os.path.abspath(directory or '.'), INIT_FILE_NAME)}"
    if scheduler_address.startswith("tcp://"):
        host, sep, port = scheduler_address.removeprefix("tcp://").rpartition(":")
        if sep and port.isdigit() and host not in ("*", "0.0.0.0"):
            return f"tcp://{host}:{int(port) + 1}"
    raise ValueError(f"cannot derive a rendezvous address from the scheduler address {scheduler_address!r}: "
                     "pass --dist-init-method (e.g. tcp://HOST:PORT)")


def check_tensor_parallel(config: ModelConfig, world_size: int) -> None:
    """Raises ValueError naming the first size of the model that does not split over ``world_size`` ranks
    (heads, KV heads, MLP width): the model is built on the meta device, nothing is allocated or read."""
    config.for_rank(world_size)
    with torch.device("meta"):
        get_model_class(config.hf_config).from_hf_config(config.hf_config, TPGroup(0, world_size))


def init_tensor_parallel(rank: int, world_size: int, init_method: str, device: torch.device) -> TPGroup:
    """Joins the ranks' process group (NCCL on CUDA, gloo on CPU) and returns this rank's TPGroup; with
    one rank, returns SINGLE and starts nothing. The first all-reduce checks that every rank came."""
    if world_size == 1:
        return SINGLE
    tp = TPGroup(rank, world_size)
    if device.type == "cuda":
        for name, value in NVLINK_MULTICAST_OFF.items():
            os.environ.setdefault(name, value)
        backend, device_id = "nccl", device
    else:
        backend, device_id = "gloo", None
        # The ranks share the host's cores. Left at one OpenMP thread per core each, their threads spin
        # against each other's while a peer waits in a collective: steps run several times slower.
        if not os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))
    # The timeout bounds the rendezvous and, on gloo, each collective; a rank whose peer dies is stopped
    # by the launcher (the scheduler fails the engine at the peer's disconnect), not by this timeout.
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(minutes=30), device_id=device_id)
    ones = torch.ones(1, device=device)
    tp.all_reduce(ones)
    if int(ones.item()) != world_size:
        raise RuntimeError(f"the process group's first all-reduce summed to {ones.item()}, not {world_size}")
    return tp


def shutdown_tensor_parallel() -> None:
    """Leaves the process group, if there is one (a clean exit; NCCL warns about groups left open)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
