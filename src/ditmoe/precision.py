"""Which autocast dtype a run uses: the one place the ``--precision`` rule lives.

``resolve_precision(precision, device, model_cfg)`` returns the autocast dtype, or None for fp32.
"fp32", "bf16" and "fp16" are taken as given. "auto" decides by hardware:

- CUDA: bf16 where the GPU computes it natively, else fp16 (the trainer scales fp16 losses).
- CPU without native bf16 instructions (neither ``amx_bf16`` nor ``avx512_bf16``): fp32. There
  oneDNN emulates bf16 products through fp32 and autocast only adds casts.
- CPU with them: a short measured probe, once per machine and model shape. One block-shaped
  forward + backward (adaLN-modulated attention and a gated MLP as wide as the model's activated
  experts) at the model's width (at most 512) and sequence length is timed in fp32 and under
  bf16 autocast, interleaved; bf16 is chosen only when its best time is below ``BF16_MARGIN`` times fp32's.
  Whether bf16 pays depends on the matrix units (AMX or AVX-512 BF16) and on the width: the
  products gain, the per-op casts cost, and the products' share grows with the width.
  The result is cached in ``<cache dir>/precision.json`` (``$DITMOE_CACHE`` or ``~/.cache/ditmoe``),
  keyed by CPU model name, the flags that matter, torch version, thread count and probe shape;
  a cache that cannot be read or written is ignored.
- Any other device: fp32.

``DITMOE_PRECISION_PROBE=0`` replaces the probe by a fixed rule from the flags (bf16 with AMX
from hidden size 384 on, else fp32), for runs that must not depend on timing.

``python -m ditmoe.precision`` prints the decision and the probe's timings for some models.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .hardware import CpuInfo, cpu_info

__all__ = [
    "BF16_MARGIN",
    "Decision",
    "ProbeShape",
    "cache_file",
    "decide",
    "decide_cpu",
    "probe_cpu",
    "probe_shape",
    "resolve_precision",
]

EXPLICIT = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# bf16 must beat fp32 by this factor: it costs accuracy, and the probe's timings are noisy.
BF16_MARGIN = 0.9
# Wider models are probed at this width: the probe stays short, and the products' share of the
# time only grows with the width, so what pays here pays for them too.
MAX_PROBE_WIDTH = 512
MAX_PROBE_TOKENS = 256
# Rows (tokens of all images) of one probe step. Autocast casts every weight once per step, a
# cost that a training batch of thousands of rows spreads thin; fewer than a few hundred rows
# would charge bf16 for it unfairly, many more would make the probe slow.
MIN_PROBE_ROWS, MAX_PROBE_ROWS = 256, 4096
# fp32 floating-point operations aimed at per probe step (forward + backward), above the
# minimum rows: enough work per step for stable timings, little enough that the probe's 8 steps
# stay short (docs/performance.md, "Precision").
PROBE_FLOPS = 3e9
# Fixed rule without the probe (DITMOE_PRECISION_PROBE=0): where AMX bf16 measured faster.
RULE_AMX_MIN_WIDTH = 384
CACHE_VERSION = 1
PROBE_ENV = "DITMOE_PRECISION_PROBE"

ProbeResult = dict  # {"fp32_ms": float, "bf16_ms": float}
# What this process measured, by (cache file, key): where the cache file cannot be written
# (read-only home, full disk) a process still probes each shape only once.
_MEASURED: dict[tuple[str, str], ProbeResult] = {}


@dataclass(frozen=True)
class ProbeShape:
    """One transformer block's workload: `images` sequences of `tokens` tokens of width `width`."""

    width: int
    heads: int
    mlp_width: int  # gated MLP hidden width: routed experts x top-k + shared expert (or dense MLP)
    tokens: int
    images: int

    def flops(self) -> float:
        """fp32 FLOPs of forward + backward (backward ~ twice the forward)."""
        rows = self.tokens * self.images
        gemm = 4 * self.width ** 2 + 3 * self.width * self.mlp_width  # qkv + proj, w1 + w3 + w2
        attn = 2 * self.tokens * self.width
        return 3 * 2 * rows * (gemm + attn)

    def key(self) -> str:
        return f"D{self.width} H{self.heads} M{self.mlp_width} T{self.tokens} x{self.images}"


@dataclass(frozen=True)
class Decision:
    dtype: torch.dtype | None
    source: str  # "explicit", "cuda", "device", "no-bf16-flags", "rule", "probe", "cache"
    reason: str
    fp32_ms: float | None = None
    bf16_ms: float | None = None
    key: str | None = None

    @property
    def name(self) -> str:
        return NAMES[self.dtype]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dtype"] = self.name
        return d


def probe_shape(model_cfg: Any) -> ProbeShape:
    """The probe's workload for a model: its width (capped), heads, activated MLP width, tokens."""
    d = int(model_cfg.hidden_size)
    width = min(d, MAX_PROBE_WIDTH)
    head_dim = max(1, d // max(1, int(model_cfg.num_heads)))
    heads = max(1, width // head_dim)
    width = heads * head_dim if width % head_dim else width
    if getattr(model_cfg, "num_experts", 0):
        mlp = model_cfg.top_k * model_cfg.routed_hidden + model_cfg.shared_width
    else:
        mlp = model_cfg.dense_hidden
    mlp_width = max(1, round(mlp * width / d))
    tokens = max(1, min(int(model_cfg.num_patches), MAX_PROBE_TOKENS))
    per_row = ProbeShape(width, heads, mlp_width, tokens, 1).flops() / tokens
    rows = min(max(PROBE_FLOPS / per_row, MIN_PROBE_ROWS), MAX_PROBE_ROWS)
    return ProbeShape(width, heads, mlp_width, tokens, max(1, round(rows / tokens)))


def _block_step(shape: ProbeShape, seed: int = 0) -> Callable[[bool], None]:
    """A closure running one block forward + backward, in fp32 or under bf16 autocast."""
    g = torch.Generator().manual_seed(seed)
    w, m = shape.width, shape.mlp_width

    def param(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=g) / size[-1] ** 0.5).requires_grad_()

    wqkv, wproj = param(3 * w, w), param(w, w)
    w1, w3, w2 = param(m, w), param(m, w), param(w, m)
    mod = (0.1 * torch.randn(6, shape.images, 1, w, generator=g)).requires_grad_()
    x0 = torch.randn(shape.images, shape.tokens, w, generator=g)

    def step(bf16: bool) -> None:
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            s1, b1, g1, s2, b2, g2 = mod
            h = F.layer_norm(x, (w,)) * (1 + s1) + b1
            q, k, v = F.linear(h, wqkv).view(shape.images, shape.tokens, 3, shape.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(shape.images, shape.tokens, w)
            x = x + g1 * F.linear(a, wproj)
            h = F.layer_norm(x, (w,)) * (1 + s2) + b2
            x = x + g2 * F.linear(F.silu(F.linear(h, w1)) * F.linear(h, w3), w2)
            loss = x.float().square().mean()
        loss.backward()
        for p in (wqkv, wproj, w1, w3, w2, mod):
            p.grad = None

    return step


def probe_cpu(shape: ProbeShape, repeats: int = 3, timer: Callable[[], float] = time.perf_counter) -> ProbeResult:
    """Best-of-`repeats` milliseconds of one block step in fp32 and under bf16 autocast.

    One untimed warm-up step each (oneDNN builds its kernels on first use); then the two
    precisions alternate, so that drifts of a shared machine hit both alike.
    """
    step = _block_step(shape)
    step(False)
    step(True)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(repeats):
        for name, bf16 in (("fp32", False), ("bf16", True)):
            t0 = timer()
            step(bf16)
            times[name].append((timer() - t0) * 1e3)
    return {"fp32_ms": min(times["fp32"]), "bf16_ms": min(times["bf16"])}


def cache_file() -> Path:
    from .eval.features import cache_dir

    return cache_dir() / "precision.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add one entry; silently does nothing where the cache cannot be written."""
    entries = _read_cache(path)
    entries[key] = entry
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)  # atomic: concurrent readers see the old or the new file, never half
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass


def cache_key(cpu: CpuInfo, shape: ProbeShape, threads: int) -> str:
    return f"{cpu.model_name} | {cpu.flag_string()} | torch {cpu.torch} | {threads} threads | {shape.key()}"


def _rule(cpu: CpuInfo, model_cfg: Any) -> Decision:
    if cpu.flags.get("amx_bf16") and model_cfg.hidden_size >= RULE_AMX_MIN_WIDTH:
        return Decision(torch.bfloat16, "rule", f"{PROBE_ENV}=0: AMX bf16 and hidden size >= {RULE_AMX_MIN_WIDTH}")
    return Decision(None, "rule", f"{PROBE_ENV}=0: bf16 only with AMX and hidden size >= {RULE_AMX_MIN_WIDTH}")


def _from_timings(timings: ProbeResult, source: str, key: str) -> Decision:
    fp32, bf16 = float(timings["fp32_ms"]), float(timings["bf16_ms"])
    faster = bf16 < BF16_MARGIN * fp32
    verdict = "below" if faster else "not below"
    reason = f"bf16 {bf16:.1f} ms / fp32 {fp32:.1f} ms = {bf16 / fp32:.2f}, {verdict} {BF16_MARGIN}"
    return Decision(torch.bfloat16 if faster else None, source, reason, fp32, bf16, key)


def decide_cpu(model_cfg: Any, *, cpu: CpuInfo | None = None, probe: Callable[[ProbeShape], ProbeResult] | None = None,
               cache: Path | None = None, use_probe: bool | None = None, force_probe: bool = False,
               threads: int | None = None) -> Decision:
    """The "auto" choice on a CPU.

    `cpu` (default: this machine), `probe` (default `probe_cpu`) and `cache` (default
    `cache_file()`) can be replaced, e.g. to decide for a described CPU with planted timings.
    `use_probe` None reads ``$DITMOE_PRECISION_PROBE`` (probing unless it is "0");
    `force_probe` probes (and caches nothing) even on a CPU without bf16 instructions.
    """
    cpu = cpu or cpu_info()
    if not force_probe:
        if not cpu.native_bf16:
            return Decision(None, "no-bf16-flags", f"no amx_bf16 / avx512_bf16 on {cpu.model_name}: bf16 is emulated")
        if use_probe is None:
            use_probe = os.environ.get(PROBE_ENV, "1").strip() != "0"
        if not use_probe:
            return _rule(cpu, model_cfg)
    shape = probe_shape(model_cfg)
    key = cache_key(cpu, shape, threads if threads is not None else torch.get_num_threads())
    path = cache if cache is not None else cache_file()
    if not force_probe:
        hit = _read_cache(path).get(key)
        if isinstance(hit, dict) and "fp32_ms" in hit and "bf16_ms" in hit:
            return _from_timings(hit, "cache", key)
        if (str(path), key) in _MEASURED:  # measured by this process, and the file was not writable
            return _from_timings(_MEASURED[str(path), key], "probe", key)
    timings = (probe or probe_cpu)(shape)
    if not force_probe:
        _MEASURED[str(path), key] = timings
        _write_cache(path, key, {"fp32_ms": timings["fp32_ms"], "bf16_ms": timings["bf16_ms"],
                                 "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
    return _from_timings(timings, "probe", key)


def decide(precision: str, device: torch.device | str, model_cfg: Any, **cpu_kwargs: Any) -> Decision:
    """`resolve_precision` with the reason for its answer (and the probe's timings, if any)."""
    if precision in EXPLICIT:
        return Decision(EXPLICIT[precision], "explicit", f"--precision {precision}")
    if precision != "auto":
        raise ValueError(f"precision {precision!r} is not one of auto, {', '.join(EXPLICIT)}")
    device = torch.device(device)
    if device.type == "cuda":
        if _cuda_bf16(device):
            return Decision(torch.bfloat16, "cuda", "CUDA with native bf16")
        return Decision(torch.float16, "cuda", "CUDA without native bf16 (before compute capability 8.0)")
    if device.type != "cpu":
        return Decision(None, "device", f"no measured rule for {device.type}")
    return decide_cpu(model_cfg, **cpu_kwargs)


def _cuda_bf16(device: torch.device) -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before the `including_emulation` argument: it did not count emulation
        return bool(torch.cuda.is_bf16_supported())


def resolve_precision(precision: str, device: torch.device | str, model_cfg: Any, *, sync_ranks: bool = False,
                      **cpu_kwargs: Any) -> torch.dtype | None:
    """Autocast dtype for `precision` ("auto", "fp32", "bf16", "fp16") on `device`; None = fp32.

    With `sync_ranks` (every rank of an initialised process group must call it), the ranks of a
    CPU run take rank 0's "auto" choice: only rank 0 probes, and timings cannot split the ranks.
    """
    import torch.distributed as dist

    sync = (sync_ranks and precision == "auto" and torch.device(device).type == "cpu"
            and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
    if not sync:
        return decide(precision, device, model_cfg, **cpu_kwargs).dtype
    box = [decide(precision, device, model_cfg, **cpu_kwargs).name if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[box[0]]


def main(argv: list[str] | None = None) -> None:
    import argparse

    from .registry import get_config

    p = argparse.ArgumentParser(description="What --precision auto picks on this machine, and why.")
    p.add_argument("models", nargs="*", default=["DiT-MoE-mnist", "DiT-MoE-S/2-8E2A"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--force-probe", action="store_true",
                   help="run the probe even where the flags already decide (no cache read or written)")
    args = p.parse_args(argv)
    cpu = cpu_info()
    print(f"CPU: {cpu.model_name}, {cpu.cores} cores, flags {cpu.flag_string()} (from {cpu.flags_source}), "
          f"torch {cpu.torch} ({torch.get_num_threads()} threads)")
    for name in args.models:
        cfg = get_config(name)
        d = decide("auto", args.device, cfg)
        print(f"{name} (D={cfg.hidden_size}, {cfg.num_patches} tokens): auto = {d.name} [{d.source}] {d.reason}")
        if args.force_probe and torch.device(args.device).type == "cpu":
            shape = probe_shape(cfg)
            t0 = time.perf_counter()
            forced = decide_cpu(cfg, cpu=cpu, force_probe=True)
            print(f"  probe {shape.key()} ({shape.flops() / 1e9:.2f} GFLOP/step, took "
                  f"{time.perf_counter() - t0:.2f} s): {forced.reason} -> {forced.name}")


if __name__ == "__main__":
    main()
