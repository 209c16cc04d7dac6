"""Where each rank sits in the tensor x pipeline x context x data-parallel grid, and its process groups.

DeepSpeed's topology orders the axes (pipe, data, model): tensor-parallel ranks are consecutive, so a TP group
stays inside a node whenever the workers per node are a multiple of `tp`. DeepSpeed's grid has no sequence axis
(upstream issue 4645), so the context-parallel ranks are placed inside its data axis: data index
i = dp_rank * cp + cp_rank. ZeRO then partitions and reduces over data x context ranks, as it must (every rank
holds the same parameters and a share of the tokens); the context groups, for the attention all-to-all, are
runs of `cp` consecutive data indices (each `tp` ranks apart), so TP x CP stays inside a node when the workers
per node are a multiple of tp x cp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

from distlm.config import describe_layout


@dataclass
class Layout:
    tp: int
    pp: int
    cp: int
    dp: int
    topology: PipeModelDataParallelTopology
    grid: PipelineParallelGrid  # DeepSpeed's "mpu": the data (x context), tensor (slice) and pipeline groups
    cp_group: dist.ProcessGroup | None  # this rank's context-parallel group; None when cp == 1

    @property
    def tp_rank(self) -> int:
        return self.grid.get_slice_parallel_rank()

    @property
    def tp_group(self):
        return self.grid.get_slice_parallel_group()

    @property
    def dp_rank(self) -> int:
        """Which model replica's batch this rank computes (its context-parallel ranks share it)."""
        return self.grid.get_data_parallel_rank() // self.cp

    @property
    def cp_rank(self) -> int:
        """Which slice of every sequence this rank holds: tokens [cp_rank * seq / cp, (cp_rank + 1) * seq / cp)."""
        return self.grid.get_data_parallel_rank() % self.cp

    @property
    def stage(self) -> int:
        return self.grid.get_stage_id()

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp - 1

    def describe(self) -> str:
        return describe_layout(self.tp, self.pp, self.cp, self.dp)


def make_layout(tp: int, pp: int, cp: int = 1) -> Layout:
    """Create the grid's process groups. Collective: every rank calls it, in the same order."""
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not a multiple of tp * pp * cp = {tp * pp * cp}")
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world // (tp * pp))
    grid = PipelineParallelGrid(topology)
    cp_group = None
    if cp > 1:
        rank = dist.get_rank()
        for data_ranks in topology.get_axis_comm_lists("data"):  # every rank creates every group, in one order
            for first in range(0, len(data_ranks), cp):
                ranks = data_ranks[first:first + cp]
                group = dist.new_group(ranks)
                if rank in ranks:
                    cp_group = group
    return Layout(tp=tp, pp=pp, cp=cp, dp=world // (tp * pp * cp), topology=topology, grid=grid, cp_group=cp_group)
