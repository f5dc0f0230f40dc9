"""Data-parallel training under `torchrun`: which process this is, and the few collective calls train needs.

    torchrun --standalone --nproc_per_node 2 -m tasks train     # two processes on this machine

`torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is the single process of a
plain run and every function here is a no-op. The backend is NCCL on GPUs and gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone logs to MLflow, writes checkpoints and outputs, and prints."""
        return self.rank == 0


def world() -> World:
    """This process's place, from torchrun's environment (a plain run is rank 0 of 1)."""
    return World(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )


def start(device: torch.device) -> None:
    """Join the process group of a torchrun launch (nothing to do for a single process)."""
    if world().size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over every process (the tensor itself for a single one)."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def share(obj: Any) -> Any:
    """Rank 0's `obj`, in every process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
