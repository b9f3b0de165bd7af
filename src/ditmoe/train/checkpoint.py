"""Training checkpoints: atomic writes, keep-last-N, exact resume.

A checkpoint is either

- one `torch.save` file `step_XXXXXXX.pt` holding plain tensors and containers only, so it loads
  with `weights_only=True`: model, EMA (labelled as such), optimizer (single-process state dicts,
  gathered on rank 0 under sharded layouts), step, RNG states, data position and both configs; or
- a sharded checkpoint, the folder `step_XXXXXXX.dcp/` (`parallel/dcp_files.py`): every rank
  writes the shards of model, EMA and optimizer it holds through torch.distributed.checkpoint,
  rank 0 the rest (step, every rank's RNG streams, data position, configs) in a side file.
  Nothing is gathered on one process. `choose_format` says when it is used.

Both are written under a temporary name in the same folder and renamed into place at the end, so
a crash or a full disk mid-write leaves the previous checkpoint loadable; listing, `--resume auto`
and pruning treat the two kinds alike and skip temporary names.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..weights_io import atomic_write, torch_load_weights_only
from ..parallel.dcp_files import FORMAT as SHARDED_FORMAT
from ..parallel.dcp_files import SIDE_FILE, SUFFIX, first_failure, is_complete, is_sharded_checkpoint, read_side_file

_NAME = re.compile(r"^step_(\d+)(\.pt|\.dcp)$")
# Layouts whose ranks each hold a part of the state: there `auto` may pick sharded checkpoints.
SHARDING_LAYOUTS = ("fsdp", "ep", "ep_fsdp")
# Bytes of training state per fp32 parameter: weights, EMA and AdamW's two moments.
STATE_BYTES_PER_PARAM = 16


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: str | Path) -> list[Path]:
    d = checkpoint_dir(out)
    if not d.exists():
        return []
    # A sharded folder counts once both files written last are there (an interrupted write keeps
    # its temporary name; a damaged copy of a folder is skipped rather than resumed from).
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))
             and (p.is_file() if m.group(2) == ".pt" else is_complete(p))]
    return [p for _, p in sorted(found)]


def choose_format(requested: str, parallel: str, world: int, state_bytes: int, sharded_above_gb: float) -> str:
    """"file" or "sharded" for --checkpoint-format `requested` ("auto", "file", "sharded").

    auto: sharded where several processes each hold a part of the state (FSDP, expert
    parallelism) and the whole state (weights + EMA + AdamW moments, `state_bytes`) exceeds
    `sharded_above_gb`: a single file would gather all of it in rank 0's host memory and be
    written by one process. Otherwise one file, readable anywhere without further steps.
    """
    if requested in ("file", "sharded"):
        return requested
    big = state_bytes > sharded_above_gb * 1e9
    return "sharded" if world > 1 and parallel in SHARDING_LAYOUTS and big else "file"


def is_sharded(path: str | Path) -> bool:
    """A folder given as a checkpoint that is (or was meant to be) a sharded one."""
    path = Path(path)
    return path.is_dir() and (path.suffix == SUFFIX or is_sharded_checkpoint(path))


def remove_checkpoint(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prune(out: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (files and sharded folders alike)."""
    for old in list_checkpoints(out)[:-keep_last]:
        remove_checkpoint(old)


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps(_numpy_state_to_json(np.random.get_state())),
        "python": json.dumps(_python_state_to_json(random.getstate())),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_json(json.loads(state["numpy"])))
    random.setstate(_python_state_from_json(json.loads(state["python"])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# numpy and python RNG states hold tuples and arrays; JSON keeps the file weights-only loadable.
def _numpy_state_to_json(s):
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def _numpy_state_from_json(s):
    return (s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4])


def _python_state_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _python_state_from_json(s):
    return (s[0], tuple(s[1]), s[2])


def save_checkpoint(out: str | Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write out/checkpoints/step_XXXXXXX.pt atomically, then prune to the newest `keep_last`."""
    path = checkpoint_dir(out) / f"step_{step:07d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    prune(out, keep_last)
    return path


def sharded_temp_dir(final: Path) -> Path:
    """Where a sharded checkpoint is written before it is renamed to `final` (rundir cleans these)."""
    return final.parent / f".{final.name}.tmp"


def _process_group():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _all_ok(ok: bool) -> bool:
    """True where every rank's `ok` is (collective): a rank that failed makes all of them stop
    together instead of leaving the others waiting in the next collective."""
    dist = _process_group()
    if dist is None:
        return ok
    flag = torch.tensor([1 if ok else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_sharded_checkpoint(out: str | Path, step: int, model, ema_model, optimizer, side: dict[str, Any],
                            per_rank: dict[str, Any], keep_last: int) -> Path | None:
    """Write out/checkpoints/step_XXXXXXX.dcp/ (collective: every rank calls it); rank 0 gets the path.

    1. rank 0 creates the temporary folder `.step_XXXXXXX.dcp.tmp` (every rank waits for it);
    2. every rank writes its shards into it (`parallel.sharded.save_sharded`; DCP writes its
       `.metadata` last, on rank 0, once all shards are written, and fsyncs the files);
    3. rank 0 gathers every rank's `per_rank` (its RNG streams) and writes the side file: `side`
       (the same on every rank), the lists of `per_rank` entries and rank 0's as in a file checkpoint;
    4. rank 0 renames the folder into place, then prunes to the newest `keep_last`; the other
       ranks wait for the rename, so the checkpoint exists when any rank returns.

    A failure on any rank raises on every rank and leaves the previous checkpoints as they were
    (the temporary folder is removed, or at the latest by the next run's start: rundir).
    """
    from ..parallel.sharded import save_sharded

    dist = _process_group()
    rank = dist.get_rank() if dist else 0
    final = checkpoint_dir(out) / f"step_{step:07d}{SUFFIX}"
    tmp = sharded_temp_dir(final)
    error: BaseException | None = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted write of this step
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    if not _all_ok(error is None):
        raise error or OSError(f"rank 0 could not create {tmp}")
    try:
        save_sharded(tmp, model, ema_model, optimizer)  # raises on every rank if any rank failed
        gathered = [None] * dist.get_world_size() if dist and rank == 0 else None
        if dist:
            dist.gather_object(per_rank, gathered, dst=0)
        else:
            gathered = [per_rank]
        if rank == 0:
            state = {"format": SHARDED_FORMAT, **side, **gathered[0],
                     **{f"{k}_per_rank": [g[k] for g in gathered] for k in per_rank}}
            atomic_write(tmp / SIDE_FILE, lambda f: torch.save(state, f))
            _fsync_dir(tmp)
            if final.exists():  # the same step written again (a rerun from an earlier checkpoint):
                # move the old one aside first, since a folder cannot be renamed over a non-empty
                # one; a crash between the two renames loses this step only, not the earlier ones
                aside = final.parent / f".{final.name}.old.tmp"
                remove_checkpoint(aside)
                os.replace(final, aside)
                os.replace(tmp, final)
                remove_checkpoint(aside)
            else:
                os.replace(tmp, final)
            _fsync_dir(final.parent)
    except BaseException as e:
        error = e
    if not _all_ok(error is None):
        if rank == 0:
            remove_checkpoint(tmp)
        if error is None:
            raise RuntimeError(f"another rank failed writing {final}")
        inner = first_failure(error)  # DCP's CheckpointException is a BaseException: its first rank's error
        if isinstance(inner, (OSError, RuntimeError)) or not isinstance(inner, Exception):  # e.g. KeyboardInterrupt
            raise inner
        raise RuntimeError(f"{type(inner).__name__}: {inner}") from inner
    if rank != 0:
        return None
    prune(out, keep_last)
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint written by `save_checkpoint`; ValueError for anything else.

    Weights-only files (model_ema.safetensors, exported models) cannot resume training: they lack
    the optimizer, step and RNG state, and the message names what to give instead.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if is_sharded(path):
        return load_sharded_in_full(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a checkpoint; give RUN/checkpoints/step_N.pt, or --resume auto "
                         "with --out RUN to continue from the newest checkpoint of RUN")
    if path.suffix == ".safetensors":
        raise ValueError(_not_a_training_checkpoint(path, "it is a weights file (safetensors)"))
    # Unsafe pickles are refused as such; unreadable files point at the older checkpoints.
    state = torch_load_weights_only(path, corrupt_hint=f"Older checkpoints in {path.parent} are still usable")
    missing = [k for k in ("step", "model", "optimizer", "model_config", "train_config") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(_not_a_training_checkpoint(path, f"it lacks {', '.join(missing)}"))
    return state


def read_sharded_header(path: str | Path) -> dict[str, Any]:
    """The side file of a sharded checkpoint (step, RNG, data position, configs), checked like a
    file checkpoint; the shards are read later, by every rank, under the run's layout."""
    path = Path(path)
    state = read_side_file(path)
    missing = [k for k in ("step", "model_config", "train_config") if k not in state]
    if missing:
        raise ValueError(_not_a_training_checkpoint(path, f"its {SIDE_FILE} lacks {', '.join(missing)}"))
    return state


def load_sharded_in_full(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint read whole into this process, in the single-file checkpoint's form
    (the optimizer state index-keyed in parameter order): for tests, inspection and conversion of
    models that fit in one host's memory. Training resumes through `parallel.sharded` instead."""
    from ..parallel.dcp_files import read_full

    path = Path(path)
    state = read_sharded_header(path)
    state["model"], state["ema"] = read_full(path, "model"), read_full(path, "ema")
    by_name = read_full(path, "optimizer")
    names = [n for g in by_name["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(names)}
    state["optimizer"] = {
        "state": {index[n]: s for n, s in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
    }
    return state


def _not_a_training_checkpoint(path: Path, why: str) -> str:
    return (f"{path} is not a training checkpoint of `ditmoe train` ({why}): resuming needs the optimizer, step "
            "and RNG state, which only RUN/checkpoints/step_N.pt holds. Give that file, or --resume auto with --out RUN")


def resolve_resume(resume: str, out: str | Path) -> Path | None:
    """'' -> None; 'auto' -> newest checkpoint in out (or None); a path -> that path, which must exist."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    if not path.exists():
        found = list_checkpoints(out)
        hint = (f"checkpoints in {checkpoint_dir(out)}: {', '.join(p.name for p in found[-3:])}" if found
                else f"{checkpoint_dir(out)} holds no checkpoint")
        raise FileNotFoundError(f"--resume {resume}: no such file ({hint}); give RUN/checkpoints/step_N.pt (or the "
                                "folder step_N.dcp of a sharded checkpoint) or --resume auto")
    return path
