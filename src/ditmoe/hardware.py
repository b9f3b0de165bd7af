"""What CPU this process runs on: model name, the vector / matrix instructions that decide bf16
speed, usable cores, torch version.

`ditmoe.precision` keys its measured precision choice on it, and the benchmarks record it in
every result file, so that a number can be traced to the machine that produced it.

Flags come from ``/proc/cpuinfo`` (Linux, x86: what the kernel enables, e.g. AMX only with
kernel support); elsewhere from torch's own CPU feature detection (``torch.cpu._is_*``, then
``torch.backends.cpu.get_cpu_capability()``).
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["CPU_FLAGS", "BF16_FLAGS", "CpuInfo", "cpu_info", "parse_cpuinfo"]

# The flags that matter for the speed of fp32 / bf16 on a CPU, in the order they are reported.
CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")
# Native bf16 arithmetic; without one of these, oneDNN emulates bf16 products through fp32.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class CpuInfo:
    model_name: str
    flags: dict[str, bool] = field(default_factory=dict)  # every name of CPU_FLAGS
    cores: int = 1  # CPUs this process may run on (affinity), as torch's default thread count
    torch: str = torch.__version__
    capability: str = ""  # torch.backends.cpu.get_cpu_capability(): the kernels torch dispatches to
    flags_source: str = ""  # "/proc/cpuinfo" or "torch"

    @property
    def native_bf16(self) -> bool:
        return any(self.flags.get(f, False) for f in BF16_FLAGS)

    def flag_string(self) -> str:
        """The flags present, e.g. ``"avx512_bf16,avx512f,avx2"`` (``"-"`` for none)."""
        return ",".join(f for f in CPU_FLAGS if self.flags.get(f)) or "-"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_cpuinfo(text: str) -> tuple[str | None, set[str] | None]:
    """(model name, flag set) of the first processor in /proc/cpuinfo text; None where absent."""
    name = flags = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and name is None:
            name = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
        if name is not None and flags is not None:
            break
    return name, flags


def _lscpu_model_name() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5, env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "Model name" and value.strip():
            return value.strip()
    return None


def _torch_flags() -> dict[str, bool]:
    """CPU features as torch's cpuinfo sees them; used where /proc/cpuinfo has no flags line."""
    probes = {"amx_tile": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported",
              "avx512f": "_is_avx512_supported", "avx2": "_is_avx2_supported"}
    flags = {f: False for f in CPU_FLAGS}
    cap = _capability()
    flags["avx512f"] = cap.startswith("AVX512")
    flags["avx2"] = cap.startswith(("AVX2", "AVX512"))
    for flag, fn in probes.items():
        probe = getattr(torch.cpu, fn, None)
        if probe is not None:
            try:
                flags[flag] = bool(probe())
            except Exception:  # a private torch helper: absent or failing means unknown, i.e. False
                pass
    # torch reports AMX tiles, not the bf16 subset; every AMX CPU so far has AMX-BF16 with them.
    flags["amx_bf16"] = flags["amx_tile"]
    return flags


def _capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        return ""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_info(cpuinfo_text: str | None = None) -> CpuInfo:
    """Describe this machine's CPU (or, with `cpuinfo_text`, the one that text describes)."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo_text = ""
    name, flag_set = parse_cpuinfo(cpuinfo_text)
    name = name or _lscpu_model_name() or platform.processor() or platform.machine() or "unknown CPU"
    if flag_set is not None:
        flags, source = {f: f in flag_set for f in CPU_FLAGS}, "/proc/cpuinfo"
    else:
        flags, source = _torch_flags(), "torch"
    return CpuInfo(model_name=name, flags=flags, cores=_cores(), torch=torch.__version__,
                   capability=_capability(), flags_source=source)


if __name__ == "__main__":
    import json

    print(json.dumps(cpu_info().as_dict(), indent=2))
