"""Where each rank sits in the tensor × pipeline × data-parallel grid, and its process groups.

DeepSpeed's topology orders the axes (pipe, data, model): tensor-parallel ranks are consecutive, so a
TP group stays inside a node whenever the workers per node are a multiple of `tp`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    topology: PipeModelDataParallelTopology
    grid: PipelineParallelGrid  # DeepSpeed's "mpu": the data, tensor (slice) and pipeline groups

    @property
    def tp_rank(self) -> int:
        return self.grid.get_slice_parallel_rank()

    @property
    def tp_group(self):
        return self.grid.get_slice_parallel_group()

    @property
    def dp_rank(self) -> int:
        return self.grid.get_data_parallel_rank()

    @property
    def stage(self) -> int:
        return self.grid.get_stage_id()

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp - 1


def make_layout(tp: int, pp: int) -> Layout:
    """Create the grid's process groups. Collective: every rank calls it, in the same order."""
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of tp * pp = {tp * pp}")
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world // (tp * pp))
    return Layout(tp=tp, pp=pp, dp=world // (tp * pp), topology=topology, grid=PipelineParallelGrid(topology))
