"""Process group from torchrun's environment: NCCL on CUDA, gloo on CPU, one process alone."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device: str | None = None, timeout_s: float = 600.0) -> World:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), if any.

    A collective that waits longer than `timeout_s` for a peer (a node died) raises, so the
    job stops instead of hanging; torchrun then restarts it (``--max-restarts``) or ends it.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            device_id=dev if dev.type == "cuda" else None,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return World(rank, size, local, dev)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(world: World, values: torch.Tensor) -> torch.Tensor:
    """Sum of `values` over ranks (a copy; the input is left alone)."""
    out = values.detach().clone()
    if world.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_float(world: World, value: float) -> float:
    """Rank 0's `value` on every rank."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.broadcast(t, 0)
    return float(t.item())
