"""Data-parallel training: one process per device, started by torchrun, each drawing its own
batches, with F's, G's and D's gradients averaged over the processes (ranks) by
DistributedDataParallel. Launched without torchrun's environment, every function here is the
single-process identity, so ``training.train`` runs one code path either way::

    torchrun --nproc_per_node N --no-python carseg train --data ... --out ... --steps ...

Rank 0 takes the decisions that depend on its clock and shares them (``decide``), and it alone
validates and writes; the others wait for it (``barrier``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

# the other ranks wait in a collective while rank 0 validates, which on a CPU takes minutes
_TIMEOUT = timedelta(minutes=60)


class RanksDivergedError(RuntimeError):
    """The ranks no longer hold the same weights, so their gradients no longer belong together."""


def launched() -> bool:
    """Whether torchrun (or a launcher that sets the same variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    """Whether this process is in a process group now."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: the group's while in one, else torchrun's ``RANK`` (0 without torchrun)."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of ranks training together (1 outside a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one that validates, writes versions and the train-state, and prints."""
    return rank() == 0


def rank_device(device: torch.device) -> torch.device:
    """The device this rank computes on: under torchrun, ``cuda`` is ``cuda:LOCAL_RANK`` (one GPU
    per process). A fixed ``cuda:N`` for several ranks is refused: they would all share one GPU."""
    if not launched() or device.type != "cuda":
        return device
    if device.index is not None:
        if int(os.environ["WORLD_SIZE"]) > 1:
            raise ValueError(f"device {device}: under torchrun each rank takes cuda:LOCAL_RANK; give cuda or auto")
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the duration (nccl on CUDA, gloo on a CPU), reading its
    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. Does nothing without torchrun,
    or when the caller has joined a group already (it is the caller's to leave)."""
    if not launched() or active():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    # nccl moves CUDA tensors only; gloo is given CPU tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank is here."""
    if active():
        dist.barrier()


def decide(*values: float) -> list[float]:
    """Rank 0's ``values`` on every rank: decisions that depend on its clock (how much of a time
    budget is spent, whether a validation is due), so that all ranks take the same steps."""
    if not active():
        return list(values)
    shared = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.broadcast(shared, src=0)
    return shared.tolist()


def mean(value: Tensor) -> Tensor:
    """The mean of ``value`` over the ranks (a copy; ``value`` itself when single-process)."""
    if not active():
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


def average_buffers(module: nn.Module) -> None:
    """Replace ``module``'s float buffers (BatchNorm's running statistics, which each rank's forward
    updated from its own batch) by their mean over the ranks, in one collective. Then every rank
    holds the same statistics, and so do the moving averages taken of them; SyncBatchNorm would do
    it within the forward, but needs CUDA."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not active() or not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1) for b in buffers])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for buffer in buffers:
        buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel while in a process group (its backward averages the
    gradients over the ranks), else ``module`` itself. Buffers are not broadcast at each forward:
    ``average_buffers`` keeps them equal after each step."""
    if not active():
        return module
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None, forward_sync_buffers=False)


def _digest(module: nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_in_sync(modules: Mapping[str, nn.Module]) -> None:
    """Raise ``RanksDivergedError`` on every rank if any rank's weights (parameters and buffers)
    differ from rank 0's. They stay equal only while every update goes through DDP or
    ``average_buffers`` and every rank takes the same steps; a slip in either is silent otherwise."""
    if not active():
        return
    digests = {name: _digest(module) for name, module in modules.items()}
    gathered: list[dict[str, str] | None] = [None] * world_size()
    dist.all_gather_object(gathered, digests)
    differ = sorted({name for other in gathered for name in digests if other is not None and other[name] != digests[name]})
    if differ:
        raise RanksDivergedError(f"rank {rank()}: the ranks' weights differ in {differ}")
