"""Data-parallel training across processes: PyTorch's ``torch.distributed`` started by
``torchrun`` (no launcher of gptlab's own).

``torchrun --standalone --nproc-per-node=N -m gptlab run ...`` starts N copies of ``gpt run``;
each finds its rank in the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``), joins the process group (gloo on the CPU, nccl on CUDA with one GPU per local
rank) and trains one replica under ``DistributedDataParallel`` (Li et al. 2020, "PyTorch
Distributed"), whose gradients are averaged across ranks in the backward pass. Only rank 0
writes files and prints. The helpers here are no-ops in a single process, so the trainer has
one code path.
"""

from __future__ import annotations

import datetime
import gc
import importlib
import os

import attrs
import torch
import torch.distributed as dist

from gptlab.core.errors import GptlabError

#: Seconds a collective may wait for the other ranks before giving up (a hung or dead peer).
DEFAULT_TIMEOUT_S = 300


class DistributedError(GptlabError):
    """A rank could not join the group, or another rank failed or stopped answering."""


@attrs.frozen
class World:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def is_main_process() -> bool:
    """Rank 0, or no torchrun: known from the environment before the group is joined."""
    return int(os.environ.get("RANK", 0)) == 0


def init(device_type: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join the process group torchrun describes (once per process); a single process without
    torchrun gets ``World()``. On CUDA each rank uses GPU ``LOCAL_RANK``."""
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World()
    if not dist.is_available():
        raise DistributedError("this torch has no torch.distributed; run a single process")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if count > 1 and local_rank >= count:
            raise DistributedError(f"local rank {local_rank} has no GPU (this machine has "
                                   f"{count}); start at most that many processes per node")
        torch.cuda.set_device(_gpu_index(world_local=local_rank))
    # before the group exists: this module's functions take ``group=group.WORLD`` as a default
    # argument, evaluated when it is first imported (by DistributedDataParallel's constructor).
    # Imported later, they would hold the group, and gloo's threads, until Python exits.
    importlib.import_module("torch.distributed.nn.functional")
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {os.environ['RANK']} could not join the {backend} process "
                               f"group: {str(e).strip().splitlines()[0]}") from None
    return current()


def current() -> World:
    """The world of an initialised process group (``World()`` if there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(rank=dist.get_rank(), size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def _gpu_index(world_local: int) -> int:
    """GPU ``LOCAL_RANK``; a launcher that shows each process one GPU (``CUDA_VISIBLE_DEVICES``
    per task) makes that GPU 0."""
    return 0 if torch.cuda.device_count() == 1 else world_local


def device_for(device: torch.device, world: World) -> torch.device:
    """One GPU per local rank (``--device cuda:N`` is overridden under torchrun); the CPU is
    shared."""
    if device.type == "cuda" and world.active:
        return torch.device("cuda", _gpu_index(world.local_rank))
    return device


def _on(device: torch.device) -> torch.device:
    """Where a scalar collective's tensor lives: the GPU for nccl, the CPU for gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_mean(values: list[float], world: World, device: torch.device) -> list[float]:
    """Average ``values`` over the ranks (the values themselves in a single process)."""
    if not world.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_on(device))
    _collective(dist.all_reduce, t, op=dist.ReduceOp.SUM)
    return (t / world.size).tolist()


def agreed_signal(signum: int | None, world: World, device: torch.device | None = None
                  ) -> int | None:
    """The signal any rank got (the largest number if several), so that every rank stops at
    the same point and reports the same signal; ``signum`` itself in a single process."""
    if not world.active:
        return signum
    t = torch.tensor([int(signum or 0)], dtype=torch.int64,
                     device=_on(device or torch.device("cpu")))
    _collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None


def rank0_choice(name: str, world: World) -> str:
    """Rank 0's ``name`` on every rank (e.g. the attention backend ``auto`` measured), so that
    the replicas compute alike; ``name`` itself in a single process."""
    if not world.active:
        return name
    box = [name]
    _collective(dist.broadcast_object_list, box, src=0)
    return box[0]


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # gloo/nccl: a peer died or timed out
        raise DistributedError(f"another training process failed or stopped answering "
                               f"({str(e).strip().splitlines()[0][:120]}); every rank stops"
                               ) from None


def shutdown() -> None:
    """Leave the process group and free it now, while Python runs.

    ``destroy_process_group`` only forgets the group: whatever still holds it (a DDP wrapper)
    keeps gloo's worker threads running into Python's exit, where they can abort the process
    (``terminate called without an active exception``: a rank's SIGABRT after a finished run).
    So unreachable holders are collected first; :meth:`Trainer.close
    <gptlab.core.trainer.Trainer.close>` releases its wrapper, and :func:`init` keeps torch's
    own module from holding the group."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
