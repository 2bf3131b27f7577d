"""The process group of a `torchrun` launch, and the few collectives the pipeline needs.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT for every process it starts. `Launch`
reads them (a plain `python` start is a world of one, with no process group), picks NCCL when the
process has a GPU and gloo otherwise, and binds each process to GPU LOCAL_RANK, so that "cuda" means
that process's own GPU everywhere downstream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sparseseg.device import resolve_device
from sparseseg.errors import SparsesegError


@dataclass
class Launch:
    """This process's place in the launch.

    Attributes:
        rank, size, local_rank: as torchrun numbers them (0, 1, 0 without torchrun).
        device: where this process computes (its own GPU under NCCL).
        backend: "nccl", "gloo" or None (a world of one, no process group).
        owned: whether `launch` created the process group (then `close` destroys it; a group the
            caller made stays the caller's).
    """

    rank: int
    size: int
    local_rank: int
    device: torch.device
    backend: str | None
    owned: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.backend is not None:
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True when every rank says ok (so that one rank's error stops all of them, not a hang)."""
        if self.backend is None:
            return ok
        flag = torch.tensor([0 if ok else 1], device=self._comm_device)
        dist.all_reduce(flag)
        return int(flag.item()) == 0

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's (n_r, ...) tensor concatenated in rank order (on CPU), on every rank."""
        if self.backend is None:
            return t.cpu()
        dev = self._comm_device
        counts = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(self.size)]
        dist.all_gather(counts, torch.tensor([len(t)], dtype=torch.long, device=dev))
        most = max(int(c.item()) for c in counts)
        padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=dev)
        padded[: len(t)] = t.to(dev)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(c.item())].cpu() for p, c in zip(parts, counts, strict=True)])

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of every rank's tensor, on every rank (on CPU)."""
        if self.backend is None:
            return t.cpu()
        out = t.to(self._comm_device).clone()
        dist.all_reduce(out)
        return out.cpu()

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def launch(device: str = "auto", timeout_s: float = 1800.0) -> Launch:
    """Join the process group torchrun describes in the environment (or be a world of one).

    Args:
        device: the config's `backbone.device` ("auto": this process's GPU when there is one, else CPU).
        timeout_s: how long a collective waits for the slowest rank (a shard of images can take a while).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise SparsesegError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible: "
                                 "start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if size == 1:
        return Launch(0, 1, 0, dev, None)
    if dist.is_initialized():  # the caller's group (a script that calls several commands)
        return Launch(rank, size, local, dev, dist.get_backend())
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return Launch(rank, size, local, dev, backend, owned=True)
