"""Run a function in N local processes with torch.distributed set up as torchrun would (tests, benchmarks).

On CPU the processes use gloo on 127.0.0.1; each gets one intra-op thread, because several
torch processes on a few cores otherwise oversubscribe them many times over.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Callable

import torch


def free_port() -> int:
    """A TCP port that was free a moment ago (the tiny race is acceptable for local runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # Done, and the group destroyed: leave without the interpreter's teardown. In it, native
    # threads that library objects (gloo, DeepSpeed) still own can be destroyed unjoined, which
    # aborts a process whose work has finished ("terminate called without an active
    # exception"; twice in about 50 runs of the ZeRO resume test of
    # tests/test_parallel_deepspeed_engine.py). An exception in `fn` still takes the normal way
    # out, so `spawn` reports it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_local(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """Call `fn(rank, world, *args)` in `world` fresh processes with the default group initialised.

    `fn` must be importable (a module-level function). An exception in any process is re-raised
    here with that process's traceback.
    """
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


__all__ = ["free_port", "spawn_local"]
