"""One process per GPU under `torchrun`: which part of the work this process takes, and the
end-of-run rendezvous where rank 0 merges the manifest and totals are summed.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain run (WORLD_SIZE unset or 1) needs none of this.
A gloo process group carries only the final barrier and counts, so it works on CPU and GPU alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int
    run_id: str


def from_env() -> Ranks | None:
    """This process's place under torchrun, or None for a single-process run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                 os.environ.get("TORCHELASTIC_RUN_ID", "run"))


def device_for(device: str | None, ranks: Ranks | None) -> str | None:
    """"cuda" (or none given, with GPUs present) -> this process's own GPU, cuda:LOCAL_RANK."""
    if ranks is None:
        return device
    if device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank % torch.cuda.device_count()}"
    return device


def start(ranks: Ranks) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        # Ranks finish their shares at different times; the barrier must outwait the slowest one.
        dist.init_process_group("gloo", timeout=timedelta(days=7))


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def sum_counts(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
