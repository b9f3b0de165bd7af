"""Which device a command runs on: the one rule for `--device` and for the default."""

from __future__ import annotations

import os


def resolve_device(arg: str | None = None, flag: str = "--device"):
    """The torch.device named by `arg` (cpu, cuda, cuda:N, mps), checked against this machine; a
    name this torch cannot use raises ValueError naming `flag`.

    Without `arg`: under torchrun (LOCAL_RANK set) with CUDA, this process's GPU `cuda:LOCAL_RANK`;
    otherwise cuda where available, else cpu.
    """
    import torch

    if arg:
        try:
            device = torch.device(arg)
        except RuntimeError as e:
            raise ValueError(f"{flag} {arg!r} is not a device name: use cpu, cuda, cuda:N or mps") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{flag} {arg}: this torch ({torch.__version__}) sees no CUDA GPU; "
                             f"use {flag} cpu or leave {flag} out")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {arg}: only {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"{flag} {arg}: MPS is not available here; use {flag} cpu or leave {flag} out")
        return device
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
