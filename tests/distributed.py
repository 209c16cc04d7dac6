"""Run a function on N real gloo ranks: local processes joined by torch.distributed, as on a cluster."""

from __future__ import annotations

import os
import socket

import deepspeed
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(fn, world: int, *args, backend: str = "gloo") -> None:
    """Call fn(rank, *args) on `world` processes; fn and args must be picklable (module-level). `backend="nccl"`
    for ranks on GPUs (tests/test_gpu.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(fn, world, port, args, backend), nprocs=world)


def _rank_main(rank: int, fn, world: int, port: int, args: tuple, backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend=backend)
    fn(rank, *args)
    dist.barrier()  # without it a rank can exit while another still talks to it
    dist.destroy_process_group()
