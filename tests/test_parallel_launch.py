"""`spawn_local`: every rank runs and its results come back; an error in one rank is raised in the
caller with its message (the ranks leave through `os._exit` only after finishing cleanly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ditmoe.parallel.launch import spawn_local


def sum_worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    (Path(out) / f"rank{rank}.txt").write_text(f"{t.item():g}")


def failing_worker(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")


def test_every_rank_runs_and_its_results_come_back(tmp_path):
    spawn_local(sum_worker, 2, str(tmp_path))
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["3", "3"]  # 1 + 2 on both


def test_an_error_in_one_rank_is_raised_in_the_caller():
    with pytest.raises(Exception, match="rank 1 fails on purpose"):
        spawn_local(failing_worker, 2)
