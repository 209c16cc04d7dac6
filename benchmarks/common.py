"""What several benchmarks share. Benchmarks run as scripts (`python benchmarks/NAME.py`), so this imports as
`common`."""

from __future__ import annotations

import os
import socket


def join_single_rank_group(use_cuda: bool = False) -> None:
    """Make this process rank 0 of a one-rank process group (on a free local port), as DeepSpeed engines need;
    a no-op if a group exists already."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
