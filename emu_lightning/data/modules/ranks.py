"""Data positions over ranks and DataLoader workers (docs/scale.md, "Resuming on several ranks").

Lightning writes the checkpoint on rank 0 only, but builds its content on every rank (`Trainer.save_checkpoint`
calls `dump_checkpoint`, and so each training loader's `state_dict`, on all of them). A loader's `state_dict` therefore
gathers every rank's position (`gather`, a collective all ranks reach together) into the one checkpoint, and its
`load_state_dict` (every rank reads that checkpoint) picks its own. Keeping one file, written atomically by rank 0,
rather than a file per rank leaves a checkpoint whole or absent, never half of its ranks.

A reader is one (rank, DataLoader worker) pair; readers are numbered `rank * workers + worker` over `world * workers`.
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.utils.data import get_worker_info


def rank_world() -> tuple[int, int]:
    """(this process's rank, number of ranks); (0, 1) outside a distributed run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(local: Any) -> list[Any]:
    """Every rank's `local`, in rank order (all ranks must call it together); `[local]` on one process."""
    _, world = rank_world()
    if world == 1:
        return [local]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, local)
    return out


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (all ranks must call it together); `value` itself on one process."""
    if rank_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reader_role(offset: int = 0) -> tuple[int, int, int]:
    """(this reader's index, number of readers, workers per rank) over ranks × DataLoader workers.

    `offset` rotates the workers' roles: after a resume at consumed batch S the DataLoader starts at worker 0, which
    must play the reader whose batch came next (S mod workers)."""
    rank, world = rank_world()
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info else (0, 1)
    return rank * nw + (wid + offset) % nw, world * nw, nw


def check_world(saved: int, world: int, what: str) -> None:
    """A stream's position cannot be re-dealt to another number of ranks: refuse, naming both sizes."""
    if saved != world:
        raise ValueError(
            f"the checkpoint's {what} position was saved on {saved} rank(s), this run has {world}: each of the "
            f"{saved} ranks' readers holds its own shards and place in them, which cannot be re-dealt to {world} "
            f"rank(s) exactly. Resume on {saved} rank(s), or drop the position (the checkpoint's "
            f"loops.fit_loop.state_dict.combined_loader) to restart the stream (docs/scale.md)")


def own_readers(readers: dict[str, Any], rank: int, workers: int) -> dict[str, Any]:
    """The entries of `readers` (reader index → position) that belong to `rank`."""
    return {k: v for k, v in readers.items() if int(k) // workers == rank}
