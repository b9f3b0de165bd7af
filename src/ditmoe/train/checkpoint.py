"""Training checkpoints: atomic writes, keep-last-N, exact resume.

A checkpoint is one `torch.save` file holding plain tensors and containers only, so it loads with
`weights_only=True`: model, EMA (labelled as such), optimizer, step, RNG states, data position and
both configs. It is written to a temporary file in the same folder and renamed into place, so a
crash or a full disk mid-write leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..weights_io import atomic_write, torch_load_weights_only

_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: str | Path) -> list[Path]:
    d = checkpoint_dir(out)
    if not d.exists():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


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
    for old in list_checkpoints(out)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint written by `save_checkpoint`; ValueError for anything else.

    Weights-only files (model_ema.safetensors, exported models) cannot resume training: they lack
    the optimizer, step and RNG state, and the message names what to give instead.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
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
        raise FileNotFoundError(f"--resume {resume}: no such file ({hint}); give RUN/checkpoints/step_N.pt or "
                                "--resume auto")
    return path
