"""The folder of a sharded checkpoint, and reading one in a single process (no process group).

A sharded checkpoint `RUN/checkpoints/step_XXXXXXX.dcp/` is what `torch.distributed.checkpoint`
(DCP) writes: one `__R_0.distcp` file of tensor shards per writing rank and a `.metadata` file
(written last, by rank 0, once every rank's shards are written) that maps each global tensor to
its chunks. Beside them `train_state.pt` (written by rank 0 after the shards) holds what is not a
tensor shard: step, every rank's RNG streams, data position, both configs. DCP holds

    {"model": model state, "ema": EMA state, "optimizer": {"state": {name: {...}}, "param_groups": [...]}}

with every tensor saved as the global (single-process) tensor, so any layout, a single process
included, reads it back (DCP cuts the chunks each reader needs).

This module imports nothing of the package: `ditmoe convert` reads the EMA weights through it
without the collective machinery of `parallel.sharded`.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch

SUFFIX = ".dcp"
SIDE_FILE = "train_state.pt"
METADATA_FILE = ".metadata"  # DCP's own name
FORMAT = "ditmoe-train-sharded"


class ShardedCheckpointError(ValueError):
    """A sharded checkpoint folder that is incomplete or damaged (the message names the folder)."""


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns on every save / load without a process group that it assumes one process; here
    that is the intent (one-process runs, conversion), so the warning is left out."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")
        yield


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A folder that looks like a sharded checkpoint (has its side file or DCP's metadata)."""
    path = Path(path)
    return path.is_dir() and ((path / SIDE_FILE).is_file() or (path / METADATA_FILE).is_file())


def is_complete(path: str | Path) -> bool:
    """Both files that are written last exist: DCP's metadata and the side file."""
    path = Path(path)
    return (path / METADATA_FILE).is_file() and (path / SIDE_FILE).is_file()


def _damaged(path: Path, why: str) -> ShardedCheckpointError:
    return ShardedCheckpointError(
        f"sharded checkpoint {path} is incomplete or damaged ({why}); it may be an interrupted write or copy. "
        f"Older checkpoints in {path.parent} are still usable (--resume auto takes the newest complete one)")


def _short(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]  # torch appends advice
    return f"{type(e).__name__}: {text[:200]}"


def check_complete(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"sharded checkpoint {path} does not exist")
    missing = [name for name in (METADATA_FILE, SIDE_FILE) if not (path / name).is_file()]
    if missing:
        raise _damaged(path, f"no {' and no '.join(missing)}")
    return path


def read_side_file(path: str | Path) -> dict[str, Any]:
    """The side file of a sharded checkpoint: step, RNG, data position, configs (no tensors shards)."""
    path = check_complete(path)
    try:
        state = torch.load(str(path / SIDE_FILE), map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # truncated or foreign file
        raise _damaged(path, f"{SIDE_FILE} is unreadable, {_short(e)}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise _damaged(path, f"{SIDE_FILE} is not the side file of a ditmoe sharded checkpoint")
    return state


def read_metadata(path: str | Path):
    """DCP's metadata of the folder (the global shape and dtype of every tensor)."""
    from torch.distributed.checkpoint import FileSystemReader

    path = check_complete(path)
    try:
        return FileSystemReader(str(path)).read_metadata()
    except OSError:
        raise
    except Exception as e:
        raise _damaged(path, f"{METADATA_FILE} is unreadable, {_short(e)}") from e


def first_failure(e: BaseException) -> BaseException:
    """The first rank's exception inside DCP's CheckpointException (a BaseException that maps each
    failed rank to (exception, traceback)); any other exception as it is."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = failures[min(failures)]
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, BaseException):
            return inner
    return e


def dcp_error(path: str | Path, e: BaseException) -> ShardedCheckpointError:
    """A failed DCP read of `path` as one sentence (a missing shard file, a short read of a truncated one)."""
    inner = first_failure(e)
    if isinstance(inner, FileNotFoundError) and inner.filename:
        why = f"{Path(inner.filename).name} is missing"
    else:
        why = _short(inner)
    return _damaged(Path(path), f"reading its shards failed: {why}")


def read_full(path: str | Path, part: str) -> dict[str, Any]:
    """One part ("model", "ema" or "optimizer") of a sharded checkpoint, whole, in this process.

    Every tensor is assembled from its chunks on the CPU: the part's full size in host memory,
    which is what a single-file export needs. Runs without a process group (also inside one:
    `no_dist` reads every chunk itself).
    """
    from torch.distributed.checkpoint import CheckpointException, FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = check_complete(path)
    read_metadata(path)  # a damaged .metadata is reported as such
    out: dict[str, Any] = {}
    try:
        # The planner builds the state dict from the metadata (the keys under `part` only); this is
        # torch's own dcp_to_torch_save without the file (dcp.load would keep only keys given to it).
        with single_process_quiet():
            _load_state_dict(out, storage_reader=FileSystemReader(str(path)),
                             planner=_EmptyStateDictLoadPlanner(keys={part}), no_dist=True)
    except (Exception, CheckpointException) as e:  # a missing or truncated shard file
        raise dcp_error(path, e) from None
    if part not in out:
        raise _damaged(path, f"it holds no {part!r} entries")
    return out[part]


__all__ = ["SUFFIX", "SIDE_FILE", "FORMAT", "ShardedCheckpointError", "is_sharded_checkpoint", "is_complete",
           "check_complete", "read_side_file", "read_metadata", "read_full", "dcp_error", "first_failure",
           "single_process_quiet"]
