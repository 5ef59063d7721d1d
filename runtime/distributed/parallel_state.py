"""TPContext: this process's place in the tensor-parallel group and the collectives the model needs.

Ranks are numbered across nodes: node ``k`` runs global ranks ``k * tp_per_node ...``. Rank 0 runs
the scheduler. The process group uses gloo on the CPU and NCCL on CUDA, rendezvousing at
``--dist-init-addr`` (``host:port``); the step channel (ZeroMQ) listens on ``port + 1`` of rank 0's host, or on a
free port when that one is taken; rank 0 broadcasts the port to the group.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from radixlm.runtime.server_args import ServerArgs, split_addr

logger = logging.getLogger(__name__)

# Followers block in a collective only while rank 0 is inside a forward pass, never while it idles (they
# wait on the step channel then), so a generous timeout only bounds a rank that wedges mid-forward.
_PG_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class TPContext:
    rank: int  # global rank in the tensor-parallel group
    world_size: int
    local_rank: int  # rank on this node (selects the GPU)
    device: str
    init_addr: str  # host:port of the rendezvous

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def step_channel_host(self) -> str:
        return split_addr(self.init_addr)[0]

    @property
    def step_channel_preferred_port(self) -> int:
        return split_addr(self.init_addr)[1] + 1

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (a tensor broadcast: no pickled objects on the wire)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    @classmethod
    def create(cls, args: ServerArgs, rank: int) -> "TPContext":
        """Join the process group as ``rank`` (blocks until every rank has joined)."""
        if not args.dist_init_addr:
            raise ValueError("dist_init_addr must be set for tp_size > 1 (the launcher fills it on one node)")
        per_node = args.tp_size // args.nnodes
        local = rank - args.node_rank * per_node
        if not 0 <= local < per_node:
            raise ValueError(f"rank {rank} does not run on node_rank {args.node_rank}")
        device = args.resolved_device
        if device.startswith("cuda"):
            gpu = args.base_gpu_id + local
            torch.cuda.set_device(gpu)
            device = f"cuda:{gpu}"
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if dist.is_initialized():
            raise ValueError("tp_size: this process already belongs to a tensor-parallel group "
                             "(one tensor-parallel Engine per process; shut the other one down first)")
        dist.init_process_group(
            backend, init_method=f"tcp://{args.dist_init_addr}", world_size=args.tp_size, rank=rank,
            timeout=_PG_TIMEOUT,
        )
        logger.info("tp rank %d/%d joined (%s, %s, pid %d)", rank, args.tp_size, backend, device, os.getpid())
        return cls(rank=rank, world_size=args.tp_size, local_rank=local, device=device, init_addr=args.dist_init_addr)

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def gather_columns(self, x: torch.Tensor, total: int) -> torch.Tensor | None:
        """Rank 0 gets every rank's ``x`` [N, C] side by side, cut to ``total`` columns; others get None."""
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.is_leader else None
        dist.gather(x.contiguous(), parts, dst=0)
        return torch.cat(parts, dim=-1)[:, :total] if parts is not None else None

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over all ranks (so every rank sizes its KV pool alike)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
