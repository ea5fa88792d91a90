"""Run a function on two CPU processes joined by torch.distributed (gloo), for "same value on 1 and N
processes" tests of metrics without a Lightning Trainer.

``run_distributed(fn, world_size=2, *args)`` spawns ``world_size`` processes; each calls
``fn(rank, world_size, *args)`` with the default process group initialised, and the return values come back
as a list ordered by rank. ``fn`` must be a module-level function (it is pickled into the children), and what it
returns must be picklable (e.g. tensors or floats).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *args: Any) -> list[Any]:
    """``[fn(0, world_size, *args), fn(1, world_size, *args), ...]`` computed in a process group."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, _free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def shard(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s share of ``tensor`` (strided, uneven sizes allowed, no padding)."""
    return tensor[rank::world_size]
