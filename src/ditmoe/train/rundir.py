"""The output folder of a training run: one run per folder, one trainer at a time.

`ditmoe train` checks the folder before it builds data or model: it must be a writable folder,
no other trainer may hold its lock (`OUT/.lock`, an flock held while the trainer lives and
released by the kernel when its process dies, even by kill -9), and a fresh run may not start
where another run left checkpoints or logs, whose pruning and logs it would mix with its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import IO

LOCK_NAME = ".lock"
# What a training run writes into its folder; `--overwrite true` deletes these and nothing else.
RUN_FILES = ("config.json", "metrics.csv", "expert_load.csv", "train_summary.json",
             "model_ema.safetensors", "model_ema.json")
_CHECKPOINT = re.compile(r"^step_\d+(\.pt|\.dcp)$")  # a file, or the folder of a sharded checkpoint
# Temporary files of `weights_io.atomic_write` (".NAME.RANDOM.tmp") for the files a run writes.
_TEMP = re.compile(r"^\.(step_\d+\.pt|config\.json|train_summary\.json|model_ema\.safetensors|model_ema\.json|"
                   r"metrics\.csv|expert_load\.csv)\..*\.tmp$")
# Folders of sharded checkpoints being written (".step_N.dcp.tmp") or replaced (".step_N.dcp.old.tmp").
_TEMP_DIR = re.compile(r"^\.step_\d+\.dcp\.(old\.)?tmp$")


def prepare_out_dir(out: Path) -> None:
    """Create `out` (and its parents); ValueError naming the problem if it is a file or not writable."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; give a folder path (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output folder {out} ({e.strerror or e}"
                         f"{': ' + str(e.filename) if e.filename else ''}); give a writable --out") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"the output folder {out} is not writable; give a writable --out or fix its permissions")


class RunLock:
    """An exclusive lock on `out/.lock` that holds the owner's pid, host and start time.

    flock locks belong to the open file: the kernel drops them when the holder exits in any way,
    so a killed trainer never leaves a lock that blocks the next one. Where the filesystem has no
    flock (some network mounts) a warning is printed and the run goes on unlocked.
    """

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME
        self._file: IO[str] | None = None
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return
        try:
            f = open(self.path, "a+")
        except OSError as e:
            raise ValueError(f"cannot write in the output folder {out} ({e.strerror or e}); "
                             "give a writable --out") from e
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = describe_holder(f.read())
            f.close()
            raise ValueError(f"{out} is in use by another `ditmoe train` ({holder}); wait for it to finish or "
                             "stop it, or give another --out") from None
        except OSError as e:
            f.close()
            print(f"warning: cannot lock {self.path} ({e.strerror or e}); make sure no other trainer uses {out}")
            return
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None


def describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no pid"


def run_files(out: Path) -> list[str]:
    """The files of a training run in `out` (relative names): checkpoints first, then logs and weights."""
    found = []
    ckpt = out / "checkpoints"
    if ckpt.is_dir():
        found += sorted(f"checkpoints/{p.name}" for p in ckpt.iterdir() if _CHECKPOINT.match(p.name))
    found += [name for name in RUN_FILES if (out / name).exists()]
    tb = out / "tensorboard"
    if tb.is_dir() and any(p.name.startswith("events.out.tfevents") for p in tb.iterdir()):
        found.append("tensorboard/")
    return found


def check_fresh_run(out: Path, resume: str, overwrite: bool) -> None:
    """Refuse to start a run in a folder that holds another one, unless it is resumed or replaced.

    A run continued from one of its own checkpoints (`--resume auto` or a path into
    OUT/checkpoints) is the same run; anything else would share the folder with the old run.
    """
    if overwrite:
        return
    found = run_files(out)
    if resume == "auto":
        # No checkpoint but the weights of a finished run: starting over would replace them.
        weights = [f for f in ("model_ema.safetensors", "train_summary.json") if f in found]
        if weights and not any(f.startswith("checkpoints/") for f in found):
            raise ValueError(f"--resume auto: {out} holds a finished run ({', '.join(weights)}) but no checkpoint "
                             f"in {out / 'checkpoints'} to continue from; replace that run with --overwrite true "
                             "(without --resume), or give another --out")
        return
    if resume and Path(resume).resolve().parent == (out / "checkpoints").resolve():
        return
    if not found:
        return
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    start = f"starting from {resume} " if resume else "a new run "
    raise ValueError(f"{out} already holds a training run ({shown}); {start}there would mix the two runs' "
                     "checkpoints and logs. Continue that run with --resume auto, replace it with --overwrite true "
                     "(deletes its checkpoints, logs and weights; other files stay), or give another --out")


def clear_run(out: Path) -> int:
    """Delete the files of the run in `out` (see `run_files`) and atomic-write leftovers; return how many."""
    removed = 0
    ckpt = out / "checkpoints"
    if ckpt.is_dir():
        for p in ckpt.iterdir():
            if p.is_dir() and (_CHECKPOINT.match(p.name) or _TEMP_DIR.match(p.name)):
                shutil.rmtree(p)
                removed += 1
            elif _CHECKPOINT.match(p.name) or _TEMP.match(p.name):
                p.unlink(missing_ok=True)
                removed += 1
        if not any(ckpt.iterdir()):
            ckpt.rmdir()
    for name in RUN_FILES:
        if (out / name).exists():
            (out / name).unlink()
            removed += 1
    tb = out / "tensorboard"
    if tb.is_dir():
        for p in tb.iterdir():
            if p.name.startswith("events.out.tfevents"):
                p.unlink() if p.is_file() else shutil.rmtree(p)
                removed += 1
        if not any(tb.iterdir()):
            tb.rmdir()
    removed += clean_temp_files(out)
    return removed


def clean_temp_files(out: Path) -> int:
    """Remove temporary files that an interrupted atomic write left in `out` and OUT/checkpoints,
    and the temporary folders of interrupted sharded checkpoint writes.

    Called while holding the folder's lock, so no live writer owns them.
    """
    removed = 0
    for d in (out, out / "checkpoints"):
        if d.is_dir():
            for p in d.iterdir():
                if _TEMP.match(p.name) and p.is_file():
                    p.unlink(missing_ok=True)
                    removed += 1
                elif d.name == "checkpoints" and _TEMP_DIR.match(p.name) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                    removed += 1
    return removed


__all__ = ["RunLock", "prepare_out_dir", "check_fresh_run", "clear_run", "clean_temp_files", "run_files",
           "RUN_FILES", "LOCK_NAME"]
