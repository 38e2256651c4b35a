"""Process-level runtime: device choice, seeding, and the torchrun process group."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = DistContext()


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size())


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under torchrun) where CUDA is available, else the CPU.
    A device this machine lacks is a ValueError naming it (shown as one line by the CLI)."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"train.device={name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"train.device={name}: torch sees no CUDA device here — use train.device=cpu or auto")
        if (device.index or 0) >= count:
            hint = (" — torchrun starts one process per GPU: --nproc_per_node at most "
                    f"{count}, or --set train.device=cpu for CPU processes" if "LOCAL_RANK" in os.environ else "")
            raise ValueError(f"device {name}: this machine has {count} CUDA device(s){hint}")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
