#!/usr/bin/env python
"""Side-by-side speed and memory of this package's MoE against the official DiT-MoE algorithm.

Contenders, run in ONE process with interleaved rounds (every round times each contender once,
the order rotating between rounds; warm-up rounds first; the median of the repeats is reported):

  official fp32   the official layer / model (``official_moe.py``: masked per-expert loop with a
                  k-fold copy in training, ``moe_infer`` in inference), in fp32 as the official
                  code runs by default, loaded with the same weights as the package's;
  package         ``ditmoe`` as shipped: fp32, bf16 autocast, and its default precision
                  (``ditmoe.train.loop.choose_precision("auto", ...)``);
  bound           one dense SwiGLU of width k*4D + 2D: exactly the activated GEMM FLOPs of the
                  routed plus shared experts with no routing at all (same precision as the
                  contender it bounds).

Benchmarks (``--only``, comma separated; default all):
  layer    MoE layer forward + backward at DiT-MoE-S/2 (D=384) and B/2 (D=768), 8 experts top-2,
           256 tokens per image, 8 and 16 images on CPU (``--batch``);
  train    a full training step of DiT-MoE-S/2-8E2A (rectified flow + balance loss, AdamW);
  sample   Euler sampling with classifier-free guidance (the batch doubles through the model);
  memory   peak memory of a training step, each contender in a fresh subprocess;
  compile  ``torch.compile`` of the package model (training step), against eager;
  mfu      CUDA only: model FLOPs utilisation of a DiT-MoE-XL/2-8E2A training step.

Before timing, the official baseline is checked to compute the package's outputs (layer:
forward, input and weight gradients, balance loss, inference path; model: train and eval
forward) to ~1e-5: the comparison is of two implementations of the same function.

Writes ``benchmarks/results/<device>.json`` and regenerates this device's section of
``docs/performance.md``. ``--quick`` runs tiny shapes once (a smoke test; it writes
``<device>-quick.json`` and leaves the docs alone unless ``--docs`` is given). A run of some of
the benchmarks (``--only``) writes ``<device>-partial.json`` and leaves the docs alone too, so
it never replaces the record of a whole run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/moe_bench.py --device cpu
    .venv/bin/python benchmarks/moe_bench.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from official_moe import DenseBound, OfficialMoE, official_from_package, officialize  # noqa: E402

BENCHES = ("layer", "train", "sample", "memory", "compile", "mfu")
LAYER_SHAPES = {"S/2 (D=384)": 384, "B/2 (D=768)": 768}
QUICK_LAYER_SHAPES = {"tiny (D=64)": 64}
NUM_EXPERTS, TOP_K = 8, 2
TARGETS = {"layer_vs_bound": 1.15, "train_speedup": 3.0, "sample_speedup": 3.0, "memory_ratio": 0.7}
PARITY_TOL = 1e-5
DOCS_BEGIN = "<!-- moe_bench:begin {slug} -->"
DOCS_END = "<!-- moe_bench:end {slug} -->"


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------ device
def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def describe_device(device: torch.device) -> dict[str, Any]:
    """The device, and under "cpu" this machine's CPU (`ditmoe.hardware.cpu_info`: model name, the
    flags that decide bf16 speed, usable cores, torch version), for CUDA runs too (the host)."""
    from ditmoe.hardware import cpu_info

    cpu = cpu_info()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return {"type": "cuda", "name": name, "slug": "cuda-" + _slug(name),
                "description": f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}",
                "torch": torch.__version__, "cpu": cpu.as_dict()}
    name, cores = cpu.model_name, cpu.cores
    return {"type": "cpu", "name": name, "cores": cores, "threads": torch.get_num_threads(),
            "slug": f"cpu-{_slug(name)}-{cores}c",
            "description": f"{name} ({cpu.flag_string()}), {cores} cores ({torch.get_num_threads()} torch threads), "
                           f"torch {torch.__version__}",
            "torch": torch.__version__, "cpu": cpu.as_dict()}


def describe_precision(device: torch.device, model: str) -> dict[str, Any]:
    """What ``--precision auto`` picks for `model` on this device and why (`ditmoe.precision`)."""
    from ditmoe.precision import decide
    from ditmoe.registry import get_config

    return {"model": model, **decide("auto", device, get_config(model)).as_dict()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


# ------------------------------------------------------------------------------ timing
def run_interleaved(contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                    device: torch.device, before_each: Callable[[], Any] | None = None) -> dict[str, dict[str, Any]]:
    """Warm-up rounds, then `repeats` rounds timing every contender once (rotating order).

    `before_each`, if given, runs untimed before every call (a cache flush, say)."""
    names = list(contenders)
    errors: dict[str, str] = {}

    def call(name: str) -> float | None:
        if name in errors:
            return None
        try:
            if before_each is not None:
                before_each()
            sync(device)
            t0 = time.perf_counter()
            contenders[name]()
            sync(device)
            return time.perf_counter() - t0
        except Exception as e:  # a contender that cannot run here is reported, not fatal
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log(f"    {name}: FAILED {errors[name]}")
            return None

    for _ in range(warmup):
        for name in names:
            call(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            dt = call(name)
            if dt is not None:
                times[name].append(dt)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in errors:
            out[name] = {"error": errors[name]}
        else:
            ts = times[name]
            out[name] = {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                         "times_ms": [round(t * 1e3, 3) for t in ts]}
    return out


def median_ms(res: dict[str, Any], name: str) -> float | None:
    return res.get(name, {}).get("median_ms")


class Checks:
    """'measured X vs target Y: PASS/MISS' lines, kept for the JSON and the docs."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, name: str, measured: float | None, target: float, op: str, unit: str = "x") -> None:
        if measured is None:
            ok, text = None, f"{name}: not measured (target {op} {target:g}{unit}): MISS"
        else:
            ok = measured <= target if op == "<=" else measured >= target
            text = f"{name}: measured {measured:.3g}{unit} vs target {op} {target:g}{unit}: {'PASS' if ok else 'MISS'}"
        self.items.append({"name": name, "measured": measured, "target": target, "op": op, "unit": unit,
                           "pass": ok, "line": text})
        log("  " + text)


# ------------------------------------------------------------------------------ models
def randomize_zero_init(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give the adaLN-Zero and output layers (zero at init) random weights, as after training.

    A freshly initialised DiT outputs exactly zero, which would make the parity check vacuous.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_package_model(name: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    from ditmoe import create_model, kernels

    torch.manual_seed(seed)
    model = create_model(name, device=device)  # built in place: XL/G weights never pass through the host
    randomize_zero_init(model, seed)
    return kernels.apply(model)


class exact_fp32:
    """Parity checks run without TF32 (the CUDA timings enable it, as the official train.py does)."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a.detach().double() - b.detach().double()).abs().max().item()
    scale = max(b.detach().double().abs().max().item(), 1e-30)
    return diff, diff / scale


def _parity_entry(what: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    diff, rel = _rel_diff(a, b)
    return {"what": what, "max_abs_diff": diff, "max_rel_diff": rel, "pass": bool(rel <= PARITY_TOL)}


def layer_parity(pkg: torch.nn.Module, off: OfficialMoE, x: torch.Tensor) -> list[dict[str, Any]]:
    """Official vs package layer in fp32: training forward, gradients, balance loss, inference."""
    entries = []
    pkg.train(), off.train()
    xp = x.detach().clone().requires_grad_(True)
    xo = x.detach().clone().requires_grad_(True)
    y_p, aux_p = pkg(xp, return_aux=True)
    y_o = off(xo)
    g = torch.randn_like(y_p)
    torch.autograd.backward([y_p, aux_p], [g, torch.ones_like(aux_p)])
    y_o.backward(g)
    entries.append(_parity_entry("train forward", y_o, y_p))
    entries.append(_parity_entry("balance loss", off.last_aux, aux_p))
    entries.append(_parity_entry("input grad", xo.grad, xp.grad))
    h = pkg.experts.hidden
    w_in_o = torch.stack([torch.cat([e.gate_proj.weight.grad.t(), e.up_proj.weight.grad.t()], 1) for e in off.experts])
    entries.append(_parity_entry("expert w_in grad", w_in_o, pkg.experts.w_in.grad))
    w_out_o = torch.stack([e.down_proj.weight.grad.t() for e in off.experts])
    entries.append(_parity_entry("expert w_out grad", w_out_o, pkg.experts.w_out.grad))
    entries.append(_parity_entry("router grad (with balance loss)", off.gate.weight.grad, pkg.gate.weight.grad))
    assert w_in_o.shape[-1] == 2 * h
    for m in (pkg, off):
        m.zero_grad(set_to_none=True)
        m.eval()
    with torch.no_grad():
        entries.append(_parity_entry("inference forward (moe_infer)", off(x), pkg(x)))
    pkg.train(), off.train()
    return entries


def model_parity(pkg: torch.nn.Module, off: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                 y: torch.Tensor) -> list[dict[str, Any]]:
    """Official-baseline DiT vs package DiT in fp32, eval and train mode (same label dropout)."""
    entries = []
    with torch.no_grad():
        pkg.eval(), off.eval()
        entries.append(_parity_entry("model eval forward", off(x, t, y), pkg(x, t, y)))
        pkg.train(), off.train()
        torch.manual_seed(123)
        out_p, aux_p = pkg(x, t, y, return_aux=True)
        torch.manual_seed(123)
        out_o = off(x, t, y)
        entries.append(_parity_entry("model train forward", out_o, out_p))
        aux_o = torch.stack([b.moe.last_aux for b in off.blocks if hasattr(b, "moe")])
        entries.append(_parity_entry("model balance losses", aux_o, aux_p))
    return entries


def log_parity(label: str, entries: list[dict[str, Any]], checks: Checks) -> None:
    worst = max(entries, key=lambda e: e["max_rel_diff"])
    for e in entries:
        log(f"    parity {label} / {e['what']}: max abs diff {e['max_abs_diff']:.2e}, rel {e['max_rel_diff']:.2e}")
    checks.add(f"parity {label}: official baseline vs package (worst: {worst['what']}, relative)",
               worst["max_rel_diff"], PARITY_TOL, "<=", "")


# ------------------------------------------------------------------------------ steps
def _zero(mod: torch.nn.Module) -> None:
    for p in mod.parameters():
        p.grad = None


def layer_step(mod: torch.nn.Module, x: torch.Tensor, grads: dict[torch.dtype, torch.Tensor],
               device: torch.device, dtype: torch.dtype | None, package: bool) -> None:
    """Forward + backward of one layer; parameter grads set to None first (zero_grad(set_to_none))."""
    _zero(mod)
    x.grad = None
    with autocast(device, dtype):
        if package:
            y, aux = mod(x, return_aux=True)
        else:
            y, aux = mod(x), None
    g = grads[y.dtype]
    if aux is not None:
        torch.autograd.backward([y, aux], [g, torch.ones_like(aux)])
    else:
        y.backward(g)


class TrainStep:
    """One training step as the package's Trainer does it: rectified-flow loss (+ balance loss
    the model returns) under the chosen autocast, backward, AdamW step, zero_grad(set_to_none).

    The official model returns no balance loss (its gradient arrives through AddAuxiliaryLoss),
    so the same step runs both. EMA and gradient clipping (off by default) are left out of both.
    """

    def __init__(self, model: Callable, params, device: torch.device, dtype: torch.dtype | None,
                 batch: dict[str, torch.Tensor], fused_adam: bool = False):
        from ditmoe.diffusion.flow import RectifiedFlow

        self.model, self.device, self.dtype, self.batch = model, device, dtype, batch
        kw = {"fused": True} if fused_adam else {}
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **kw)
        self.flow = RectifiedFlow()

    def __call__(self) -> float:
        b = self.batch
        model = self.model

        def model_fn(xt, t, y):
            return model(xt, t, y, return_aux=True)

        with autocast(self.device, self.dtype):
            terms = self.flow.training_losses(model_fn, b["x"], b["t"], noise=b["noise"], model_kwargs={"y": b["y"]})
        loss = terms["loss"].float().mean()
        if "aux" in terms and terms["aux"].numel():
            loss = loss + terms["aux"].float().sum()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float("nan")


def make_batch(cfg, n: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, cfg.in_channels, cfg.input_size, cfg.input_size)
    return {"x": torch.randn(shape, generator=g).to(device),
            "noise": torch.randn(shape, generator=g).to(device),
            "t": torch.sigmoid(torch.randn(n, generator=g)).to(device),
            "y": torch.randint(0, cfg.num_classes, (n,), generator=g).to(device)}


# ------------------------------------------------------------------------------ benchmarks
def bench_layer(args, device, checks: Checks) -> dict[str, Any]:
    from ditmoe import kernels
    from ditmoe.models.moe import MoE

    shapes = QUICK_LAYER_SHAPES if args.quick else LAYER_SHAPES
    bf16 = torch.bfloat16
    out: dict[str, Any] = {}
    for (shape, d), batch in ((sd, b) for sd in shapes.items() for b in args.batch):
        label = shape if len(args.batch) == 1 else f"{shape} x{batch}"
        log(f"[layer] {shape}: batch {batch} x {args.tokens} tokens, {NUM_EXPERTS} experts top-{TOP_K}, "
            f"expert hidden {4 * d}, shared {2 * d}")
        torch.manual_seed(0)
        pkg = kernels.apply(MoE(d, NUM_EXPERTS, TOP_K, 4 * d, 2 * d).to(device))
        off = official_from_package(pkg, args.official_tp)
        bound = DenseBound(d, TOP_K, 4 * d, 2 * d).to(device)
        x = torch.randn(batch, args.tokens, d, device=device)
        with exact_fp32():
            parity = layer_parity(pkg, off, x[: max(1, min(2, batch))])
        log_parity(f"layer {label}", parity, checks)
        with torch.no_grad():
            idx = pkg.gate(x.reshape(-1, d)).expert_ids
            load = torch.bincount(idx.reshape(-1), minlength=NUM_EXPERTS).tolist()
        x.requires_grad_(True)
        g = torch.randn_like(x)
        grads = {torch.float32: g, bf16: g.to(bf16)}
        contenders = {
            "official fp32": lambda: layer_step(off, x, grads, device, None, False),
            "package fp32": lambda: layer_step(pkg, x, grads, device, None, True),
            "bound fp32": lambda: layer_step(bound, x, grads, device, None, False),
            "package bf16": lambda: layer_step(pkg, x, grads, device, bf16, True),
            "bound bf16": lambda: layer_step(bound, x, grads, device, bf16, False),
        }
        res = run_interleaved(contenders, args.layer_repeats, args.warmup, device)
        tokens = batch * args.tokens
        flops = 3 * 2 * tokens * 3 * d * (TOP_K * 4 * d + 2 * d)  # fwd + bwd GEMMs of the experts
        for name, r in res.items():
            if "median_ms" in r:
                r["gflops_per_s"] = flops / (r["median_ms"] / 1e3) / 1e9
                log(f"    {name:14s} median {r['median_ms']:9.2f} ms  ({r['gflops_per_s']:.0f} GFLOP/s on expert GEMMs)")
        ratios = {}
        for prec in ("fp32", "bf16"):
            p, b = median_ms(res, f"package {prec}"), median_ms(res, f"bound {prec}")
            ratios[f"package/bound {prec}"] = p / b if p and b else None
            checks.add(f"layer {shape} batch {batch} fwd+bwd package {prec} / bound {prec}", ratios[f"package/bound {prec}"],
                       TARGETS["layer_vs_bound"], "<=")
        o, p = median_ms(res, "official fp32"), median_ms(res, "package fp32")
        ratios["official fp32 / package fp32"] = o / p if o and p else None
        pb = median_ms(res, "package bf16")
        ratios["official fp32 / package bf16"] = o / pb if o and pb else None
        ratios["official fp32 / bound fp32"] = o / median_ms(res, "bound fp32") if o and median_ms(res, "bound fp32") else None
        for k, v in ratios.items():
            if v is not None:
                log(f"    {k}: {v:.2f}x")
        out[label] = {"shape": shape, "dim": d, "batch": batch, "tokens": args.tokens, "num_experts": NUM_EXPERTS,
                      "top_k": TOP_K, "expert_hidden": 4 * d, "shared_hidden": 2 * d, "expert_load": load,
                      "gemm_flops": flops, "times": res, "ratios": ratios, "parity": parity}
        del pkg, off, bound, x, g, grads
        gc.collect()
    return out


def build_pair(args, device, checks: Checks, label: str):
    """Package DiT and the official-baseline DiT with the same weights, parity-checked in fp32."""
    from ditmoe.registry import get_config

    cfg = get_config(args.model)
    pkg = build_package_model(args.model, device)
    off = officialize(copy.deepcopy(pkg), args.official_tp)
    b = make_batch(cfg, 2, device, seed=1)
    with exact_fp32():
        parity = model_parity(pkg, off, b["x"], b["t"], b["y"])
    log_parity(f"{label} model {args.model}", parity, checks)
    return cfg, pkg, off, parity


def bench_train(args, device, checks: Checks) -> dict[str, Any]:
    from ditmoe.train.loop import choose_precision

    log(f"[train] {args.model}, batch {args.train_batch}, rectified flow + balance loss, AdamW")
    cfg, pkg, off, parity = build_pair(args, device, checks, "train")
    default = choose_precision("auto", device, cfg)
    batch = make_batch(cfg, args.train_batch, device)
    pkg_name = f"package default ({dtype_name(default)})"
    contenders = {
        "official fp32": TrainStep(off, off.parameters(), device, None, batch),
        # the package steps with fused AdamW, as ditmoe.train.engine.build_optimizer does in one process
        pkg_name: TrainStep(pkg, pkg.parameters(), device, default, batch, fused_adam=True),
    }
    if default is not None:
        contenders["package fp32"] = TrainStep(pkg, pkg.parameters(), device, None, batch, fused_adam=True)
    res = run_interleaved(contenders, args.repeats, args.warmup, device)
    for name, r in res.items():
        if "median_ms" in r:
            log(f"    {name:24s} median {r['median_ms']:10.1f} ms")
    o, p = median_ms(res, "official fp32"), median_ms(res, pkg_name)
    speedup = o / p if o and p else None
    checks.add(f"train step {args.model} official fp32 / {pkg_name} (speed-up)", speedup, TARGETS["train_speedup"], ">=")
    pf = median_ms(res, "package fp32")
    out = {"model": args.model, "batch": args.train_batch, "default_precision": dtype_name(default),
           "times": res, "speedup_vs_official": speedup,
           "speedup_fp32_vs_official": o / pf if o and pf else None, "parity": parity}
    del pkg, off, contenders
    gc.collect()
    return out


def bench_sample(args, device, checks: Checks) -> dict[str, Any]:
    from ditmoe.samplers import sample
    from ditmoe.train.loop import choose_precision

    steps = args.sample_steps
    log(f"[sample] {args.model}, Euler {steps} steps (reported scaled to 50), CFG {args.cfg_scale}, "
        f"batch {args.sample_batch} ({2 * args.sample_batch} through the model)")
    cfg, pkg, off, parity = build_pair(args, device, checks, "sample")
    pkg.eval(), off.eval()
    default = choose_precision("auto", device, cfg)
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, cfg.num_classes, (args.sample_batch,), generator=g).to(device)
    noise = torch.randn(args.sample_batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(device)

    def run(model, dtype):
        with torch.inference_mode(), autocast(device, dtype):
            return sample(model, "flow", "euler", steps, labels, args.cfg_scale, noise=noise)

    pkg_name = f"package default ({dtype_name(default)})"
    contenders = {"official fp32": lambda: run(off, None), pkg_name: lambda: run(pkg, default)}
    res = run_interleaved(contenders, args.repeats, args.warmup, device)
    scale = 50.0 / steps
    for name, r in res.items():
        if "median_ms" in r:
            r["per_50_steps_s"] = r["median_ms"] * scale / 1e3
            log(f"    {name:24s} median {r['median_ms']:10.1f} ms for {steps} steps "
                f"= {r['per_50_steps_s']:.1f} s per 50 steps")
    o, p = median_ms(res, "official fp32"), median_ms(res, pkg_name)
    speedup = o / p if o and p else None
    checks.add(f"sampling {args.model} official fp32 / {pkg_name} (speed-up)", speedup, TARGETS["sample_speedup"], ">=")
    del pkg, off
    gc.collect()
    return {"model": args.model, "batch": args.sample_batch, "model_batch": 2 * args.sample_batch,
            "steps_measured": steps, "cfg_scale": args.cfg_scale, "package_precision": dtype_name(default),
            "times": res, "speedup_vs_official": speedup, "parity": parity}


# --- memory: each contender in a fresh process ---------------------------------------
def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0: write 5 to clear_refs); True if it took effect."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    hwm, rss = _proc_status_kb("VmHWM"), _proc_status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss * 1.05 + 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_child(args) -> None:
    """Runs in a fresh process: warm-up step, then the peak of one more training step."""
    from ditmoe.registry import get_config
    from ditmoe.train.loop import choose_precision

    device = torch.device(args.device)
    cfg = get_config(args.model)
    model = build_package_model(args.model, device)
    if args._contender == "official":
        officialize(model, args.official_tp)  # in place: the package experts are freed
        dtype = None
    else:
        dtype = choose_precision("auto", device, cfg)
    batch = make_batch(cfg, args.train_batch, device)
    step = TrainStep(model, model.parameters(), device, dtype, batch, fused_adam=args._contender != "official")
    step()  # allocates the optimizer state; its peak is not the steady state
    gc.collect()
    rec: dict[str, Any] = {"contender": args._contender, "precision": dtype_name(dtype),
                           "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        rec.update(method="torch.cuda.max_memory_allocated", resident_bytes=before, peak_bytes=peak,
                   step_peak_bytes=peak - before)
    else:
        _malloc_trim()
        before = (_proc_status_kb("VmRSS") or 0) * 1024
        ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        reset = _reset_peak_rss()
        step()
        ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if reset:
            peak, method = (_proc_status_kb("VmHWM") or 0) * 1024, "VmHWM after clear_refs reset"
        else:  # ru_maxrss is a process-lifetime high-water mark: only growth past it shows
            peak, method = ru_after, "ru_maxrss"
        rec.update(method=method, resident_bytes=before, peak_bytes=peak, step_peak_bytes=peak - before,
                   ru_maxrss_before=ru_before, ru_maxrss_after=ru_after)
    print("MEMORY_JSON " + json.dumps(rec), flush=True)


def bench_memory(args, device, checks: Checks) -> dict[str, Any]:
    from ditmoe.registry import get_config
    from ditmoe.train.loop import choose_precision

    cfg = get_config(args.model)
    default = choose_precision("auto", device, cfg)
    names = {"official": "official fp32", "package": f"package default ({dtype_name(default)})"}
    log(f"[memory] {args.model}, batch {args.train_batch}: peak of one steady-state training step, "
        f"each contender in a fresh process")
    env = dict(os.environ)
    # Large allocations straight from mmap, so RSS follows the live tensors (glibc would otherwise
    # keep freed blocks of up to 32 MB on its heap and the peak would depend on its history).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names.values()}
    errors: dict[str, str] = {}
    rounds = max(1, min(args.repeats, 2))
    order = list(names)
    for r in range(rounds):
        for c in (order if r % 2 == 0 else order[::-1]):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", "memory", "--_contender", c,
                   "--device", args.device, "--model", args.model, "--train-batch", str(args.train_batch),
                   "--official-tp", str(args.official_tp)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("MEMORY_JSON ")]
            if p.returncode != 0 or not line:
                errors[names[c]] = (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
                log(f"    {names[c]}: FAILED {errors[names[c]]}")
                continue
            rec = json.loads(line[-1][len("MEMORY_JSON "):])
            runs[names[c]].append(rec)
    out: dict[str, Any] = {"model": args.model, "batch": args.train_batch, "contenders": {}}
    for name, recs in runs.items():
        if not recs:
            out["contenders"][name] = {"error": errors.get(name, "no run")}
            continue
        mb = lambda key: statistics.median(r[key] for r in recs) / 2 ** 20  # noqa: E731
        out["contenders"][name] = {"step_peak_mb": mb("step_peak_bytes"), "resident_mb": mb("resident_bytes"),
                                   "peak_mb": mb("peak_bytes"), "method": recs[0]["method"], "runs": recs}
        c = out["contenders"][name]
        log(f"    {name:24s} step peak {c['step_peak_mb']:9.1f} MB above {c['resident_mb']:9.1f} MB resident "
            f"(process peak {c['peak_mb']:.1f} MB; {c['method']})")
    o = out["contenders"].get(names["official"], {})
    p = out["contenders"].get(names["package"], {})
    ratio = p["step_peak_mb"] / o["step_peak_mb"] if "step_peak_mb" in p and "step_peak_mb" in o else None
    total = p["peak_mb"] / o["peak_mb"] if "peak_mb" in p and "peak_mb" in o else None
    out["step_peak_ratio"], out["process_peak_ratio"] = ratio, total
    if total is not None:
        log(f"    process peak (weights + optimizer state + step) package / official: {total:.2f}x")
    checks.add(f"training-step peak memory {args.model} {names['package']} / official fp32 "
               f"(above resident weights + optimizer state)", ratio, TARGETS["memory_ratio"], "<=")
    return out


def _err(e: BaseException) -> str:
    """One line: the exception's first line, plus the root cause where torch wraps it."""
    text = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    cause = e.__cause__ or e.__context__
    while cause is not None and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        text += f" (caused by {type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:200]})"
    return text


def compare_compiled(what: str, eager: Callable, make_compiled: Callable[[], Callable], names: dict[str, str],
                     repeats: int, warmup: int, device: torch.device, out: dict[str, Any]) -> None:
    """Compile (timed: the first call), then time eager against compiled, interleaved; results,
    or the failure, go into `out` (compile_s, times, speedup_vs_eager / error, traceback_tail)."""
    try:
        compiled = make_compiled()
        t0 = time.perf_counter()
        compiled()  # the first call compiles (for a training step: forward and backward graphs)
        sync(device)
        out["compile_s"] = time.perf_counter() - t0
        log(f"    first compiled {what} (compilation) {out['compile_s']:.1f} s")
        res = run_interleaved({names["eager"]: eager, names["compiled"]: compiled}, repeats, warmup, device)
        for name, r in res.items():
            if "median_ms" in r:
                log(f"    {name:36s} median {r['median_ms']:10.2f} ms")
        e, c = median_ms(res, names["eager"]), median_ms(res, names["compiled"])
        out.update(times=res, speedup_vs_eager=e / c if e and c else None)
        if out["speedup_vs_eager"]:
            log(f"    compiled {what} speed-up over eager: {out['speedup_vs_eager']:.2f}x")
    except Exception as e:
        out["error"] = _err(e)
        out["traceback_tail"] = traceback.format_exc().splitlines()[-6:]
        log(f"    torch.compile ({what}) failed: {out['error']}")


def bench_compile(args, device, checks: Checks) -> dict[str, Any]:
    """torch.compile of the package model: a training step, and (not with --quick) the sampler's
    inference forward (batch 2 x --sample-batch; mode "reduce-overhead", i.e. CUDA graphs, on CUDA),
    each against eager at the default precision. Failures are recorded, not raised."""
    from ditmoe.registry import get_config
    from ditmoe.train.loop import choose_precision

    cfg = get_config(args.model)
    default = choose_precision("auto", device, cfg)
    prec = dtype_name(default)
    log(f"[compile] torch.compile({args.model}) training step, batch {args.train_batch}, {prec}")
    model = build_package_model(args.model, device)
    batch = make_batch(cfg, args.train_batch, device)
    out: dict[str, Any] = {"model": args.model, "batch": args.train_batch, "precision": prec}

    # Graph breaks of the training forward (dynamo tracing only, no code generation).
    try:
        import torch._dynamo as dynamo

        with autocast(device, default):
            ex = dynamo.explain(model)(batch["x"], batch["t"], batch["y"], return_aux=True)
        out["graphs"], out["graph_breaks"] = ex.graph_count, ex.graph_break_count
        out["break_reasons"] = sorted({str(getattr(r, "reason", r)).splitlines()[0][:200] for r in ex.break_reasons})[:8]
        log(f"    dynamo: {ex.graph_count} graph(s), {ex.graph_break_count} graph break(s)"
            + (f"; e.g. {out['break_reasons'][0]}" if out["break_reasons"] else ""))
        dynamo.reset()
    except Exception as e:
        out["explain_error"] = _err(e)
        log(f"    dynamo.explain failed: {out['explain_error']}")

    eager = TrainStep(model, model.parameters(), device, default, batch, fused_adam=True)
    compare_compiled("training step", eager,
                     lambda: TrainStep(torch.compile(model), model.parameters(), device, default, batch, fused_adam=True),
                     {"eager": f"package eager ({prec})", "compiled": f"package compiled ({prec})"},
                     args.repeats, args.warmup, device, out)

    if not args.quick:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        n = 2 * args.sample_batch
        fb = make_batch(cfg, n, device, seed=4)
        model.eval()
        log(f"[compile] torch.compile({args.model}, mode={mode!r}) inference forward, batch {n}, {prec}")

        def forward(m):
            def run():
                with torch.inference_mode(), autocast(device, default):
                    return m(fb["x"], fb["t"], fb["y"])
            return run

        fwd: dict[str, Any] = {"batch": n, "mode": mode}
        compare_compiled("forward", forward(model), lambda: forward(torch.compile(model, mode=mode)),
                         {"eager": f"forward eager ({prec})", "compiled": f"forward compiled {mode} ({prec})"},
                         max(args.repeats, 5), max(args.warmup, 2), device, fwd)
        out["forward"] = fwd
    del model
    gc.collect()
    return out


# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
PEAK_BF16 = [("H200", 989e12, "H200 (SXM) dense bf16 989 TFLOP/s"),
             ("H100 PCIE", 756e12, "H100 PCIe dense bf16 756 TFLOP/s"),
             ("H100 NVL", 835e12, "H100 NVL dense bf16 835 TFLOP/s"),
             ("H100", 989e12, "H100 SXM dense bf16 989 TFLOP/s"),
             ("A100", 312e12, "A100 dense bf16 312 TFLOP/s"),
             ("L40S", 362e12, "L40S dense bf16 362 TFLOP/s")]


def peak_bf16(name: str, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
    up = name.upper()
    for key, peak, text in PEAK_BF16:
        if key in up:
            return peak, text
    return None, "unknown GPU: pass --peak-tflops"


def bench_mfu(args, device, checks: Checks) -> dict[str, Any]:
    from ditmoe.accounting import model_stats
    from ditmoe.registry import get_config
    from ditmoe.train.loop import choose_precision

    if device.type != "cuda":
        log("[mfu] skipped: CUDA only")
        return {"skipped": "CUDA only"}
    name = args.mfu_model
    cfg = get_config(name)
    default = choose_precision("auto", device, cfg)
    peak, peak_text = peak_bf16(torch.cuda.get_device_name(device), args.peak_tflops)
    stats = model_stats(cfg, image_size=cfg.input_size * 8)
    log(f"[mfu] {name} training step, {dtype_name(default)}, assumed peak: {peak_text}")
    out: dict[str, Any] = {"model": name, "precision": dtype_name(default), "peak_flops": peak,
                           "peak_assumed": peak_text, "gmacs_per_image": stats.gmacs,
                           "gmacs_with_attention_per_image": stats.gmacs_with_attention}
    batch_size = args.mfu_batch
    while batch_size >= 1:
        model = step = None
        try:
            model = build_package_model(name, device)
            batch = make_batch(cfg, batch_size, device)
            step = TrainStep(model, model.parameters(), device, default, batch, fused_adam=True)
            res = run_interleaved({"package": step}, args.repeats, args.warmup, device)
            if "error" in res["package"]:
                raise RuntimeError(res["package"]["error"])
            break
        except Exception as e:  # out of memory: halve the batch
            out.setdefault("retries", []).append(f"batch {batch_size}: {type(e).__name__}: {str(e)[:200]}")
            log(f"    batch {batch_size} failed ({type(e).__name__}); halving")
            del model, step
            gc.collect()
            torch.cuda.empty_cache()
            batch_size //= 2
    else:
        out["error"] = "no batch size ran"
        return out
    t = res["package"]["median_ms"] / 1e3
    # Activated FLOPs: forward MACs x 2 (FLOPs) x 3 (forward + backward).
    flops = 3 * 2 * stats.gmacs_with_attention * 1e9 * batch_size
    flops_paper = 3 * 2 * stats.gmacs * 1e9 * batch_size
    out.update(batch=batch_size, times=res, step_s=t, flops_per_step=flops, achieved_tflops=flops / t / 1e12,
               mfu=flops / t / peak if peak else None, mfu_paper_gmacs=flops_paper / t / peak if peak else None,
               peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9)
    log(f"    batch {batch_size}: {t * 1e3:.1f} ms per step, {out['achieved_tflops']:.1f} TFLOP/s achieved"
        + (f", MFU {out['mfu'] * 100:.1f}% (paper GMACs without QK/AV: {out['mfu_paper_gmacs'] * 100:.1f}%)" if peak else ""))
    del model, step
    gc.collect()
    torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------ report
def _fmt_ms(r: dict[str, Any] | None) -> str:
    if not r:
        return "n/a"
    if "error" in r:
        return "error: " + r["error"].replace("|", "/")
    v = r["median_ms"]
    return f"{v / 1e3:.2f} s" if v >= 10_000 else f"{v:.1f} ms"


def _fmt_x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def render_section(report: dict[str, Any]) -> str:
    dev = report["device"]
    res = report["results"]
    lines = [f"### {dev['description']}", "",
             f"Measured {report['timestamp']} with:", "", "```", report["command"], "```", ""]
    if report.get("quick"):
        lines += ["**--quick run: tiny shapes, one repeat; a smoke test, not a measurement.**", ""]
    layer_rounds = report["settings"].get("layer_repeats", report["repeats"])
    lines += [f"Median of {report['repeats']} interleaved rounds ({layer_rounds} for the layer) after "
              f"{report['warmup']} warm-up round(s); "
              f"official baseline with pretraining_tp={report['settings']['official_tp']} as the official expert MLP; "
              f"glibc malloc: {report['settings'].get('malloc', 'default')} (all contenders).", ""]
    if "layer" in res:
        lines += ["**MoE layer, forward + backward** (8 experts top-2, 256 tokens per image; "
                  "bound = one dense SwiGLU with the same activated GEMM FLOPs)", "",
                  "| shape | batch | official fp32 | package fp32 | bound fp32 | package bf16 | bound bf16 "
                  "| package / bound fp32 | package / bound bf16 | official / package fp32 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for label, r in res["layer"].items():
            t = r["times"]
            q = r["ratios"]
            lines.append(f"| {r.get('shape', label)} | {r['batch']} | {_fmt_ms(t.get('official fp32'))} | {_fmt_ms(t.get('package fp32'))} "
                         f"| {_fmt_ms(t.get('bound fp32'))} | {_fmt_ms(t.get('package bf16'))} | {_fmt_ms(t.get('bound bf16'))} "
                         f"| {_fmt_x(q.get('package/bound fp32'))} | {_fmt_x(q.get('package/bound bf16'))} "
                         f"| {_fmt_x(q.get('official fp32 / package fp32'))} |")
        lines.append("")
    if "train" in res:
        r = res["train"]
        lines += [f"**Training step**, {r['model']}, batch {r['batch']} (32x32x4 latents, rectified flow + balance loss, AdamW)", "",
                  "| contender | median step | official / this |", "| --- | --- | --- |"]
        o = median_ms(r["times"], "official fp32")
        for name, t in r["times"].items():
            m = t.get("median_ms")
            lines.append(f"| {name} | {_fmt_ms(t)} | {_fmt_x(o / m if o and m else None)} |")
        lines.append("")
    if "sample" in res:
        r = res["sample"]
        lines += [f"**Sampling**, {r['model']}, Euler with CFG {r['cfg_scale']}, batch {r['batch']} "
                  f"({r['model_batch']} through the model); {r['steps_measured']} steps measured, scaled to 50", "",
                  "| contender | 50 steps | official / this |", "| --- | --- | --- |"]
        o = median_ms(r["times"], "official fp32")
        for name, t in r["times"].items():
            m = t.get("median_ms")
            val = f"{t['per_50_steps_s']:.1f} s" if "per_50_steps_s" in t else _fmt_ms(t)
            lines.append(f"| {name} | {val} | {_fmt_x(o / m if o and m else None)} |")
        lines.append("")
    if "memory" in res:
        r = res["memory"]
        lines += [f"**Training-step peak memory**, {r['model']}, batch {r['batch']} (fresh process per contender; "
                  "step peak = peak during one steady-state step minus the resident weights and optimizer state "
                  "before it)", "",
                  "| contender | step peak | resident before | process peak | method |", "| --- | --- | --- | --- | --- |"]
        for name, c in r["contenders"].items():
            if "error" in c:
                lines.append(f"| {name} | error: {c['error']} | | | |")
            else:
                lines.append(f"| {name} | {c['step_peak_mb']:.0f} MB | {c['resident_mb']:.0f} MB | {c['peak_mb']:.0f} MB | {c['method']} |")
        lines += ["", f"Package / official: step peak {_fmt_x(r.get('step_peak_ratio'))}, "
                      f"process peak {_fmt_x(r.get('process_peak_ratio'))}.", ""]
    if "compile" in res:
        r = res["compile"]
        lines += [f"**torch.compile**, {r['model']}, {r['precision']} (eager vs compiled, interleaved)", ""]
        if "graphs" in r:
            reasons = "; ".join(r.get("break_reasons", [])).replace("|", "/")
            lines += [f"Dynamo: {r['graphs']} graph(s), {r['graph_breaks']} graph break(s) in the training forward"
                      + (f" ({reasons})" if reasons else "") + ".", ""]
        rows = []
        if "error" in r:
            rows.append(f"| training step, batch {r['batch']} | torch.compile failed: `{r['error'].replace('|', '/')}` | | |")
        elif "times" in r:
            t = list(r["times"].values())
            rows.append(f"| training step, batch {r['batch']} | {_fmt_ms(t[0])} | {_fmt_ms(t[1])} "
                        f"| {_fmt_x(r.get('speedup_vs_eager'))} (compilation {r['compile_s']:.0f} s) |")
        f = r.get("forward")
        if f:
            if "error" in f:
                rows.append(f"| inference forward, batch {f['batch']}, mode {f['mode']} | torch.compile failed: "
                            f"`{f['error'].replace('|', '/')}` | | |")
            else:
                t = list(f["times"].values())
                rows.append(f"| inference forward, batch {f['batch']}, mode {f['mode']} | {_fmt_ms(t[0])} | {_fmt_ms(t[1])} "
                            f"| {_fmt_x(f.get('speedup_vs_eager'))} (compilation {f['compile_s']:.0f} s) |")
        lines += ["| what | eager | compiled | speed-up |", "| --- | --- | --- | --- |"] + rows + [""]
    if "mfu" in res and "skipped" not in res["mfu"]:
        r = res["mfu"]
        if "error" in r:
            lines += [f"**MFU**: {r['error']}", ""]
        else:
            mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "n/a (unknown peak)"
            lines += [f"**Model FLOPs utilisation**, {r['model']} training step, batch {r['batch']}, {r['precision']}: "
                      f"{r['step_s'] * 1e3:.0f} ms per step, {r['achieved_tflops']:.0f} TFLOP/s, MFU {mfu} "
                      f"(FLOPs = 3 x 2 x forward MACs incl. QK/AV = {r['gmacs_with_attention_per_image']:.1f} GMACs per image; "
                      f"peak assumed: {r['peak_assumed']}).", ""]
    lines += ["**Targets**", ""]
    for c in report["checks"]:
        lines.append(f"- {c['line']}")
    lines.append("")
    return "\n".join(lines)


DOCS_HEADER = """# Performance

Numbers in this file come from `benchmarks/moe_bench.py`; each section below is regenerated by the
command shown in it (one section per machine). See that script's docstring for what is measured.
"""


def update_docs(path: Path, report: dict[str, Any]) -> None:
    slug = report["device"]["slug"] + ("-quick" if report.get("quick") else "")
    begin, end = DOCS_BEGIN.format(slug=slug), DOCS_END.format(slug=slug)
    section = f"{begin}\n{render_section(report)}\n{end}"
    text = path.read_text() if path.exists() else DOCS_HEADER
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + section + post
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat (smoke test)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; --quick 1)")
    p.add_argument("--layer-repeats", type=int, default=None,
                   help="timed rounds of the layer benchmark, whose rounds take seconds (default 15; --quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds (default 1)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHES)}")
    p.add_argument("--batch", default=None,
                   help="layer benchmark images, comma-separated for several (default 8,16 on cpu: 16 is the training "
                        "step's batch; 32 on cuda; --quick 2)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per image in the layer benchmark (default 256)")
    p.add_argument("--model", default=None, help="model of train/sample/memory/compile (default DiT-MoE-S/2-8E2A)")
    p.add_argument("--train-batch", type=int, default=None, help="training-step batch (default 16)")
    p.add_argument("--sample-batch", type=int, default=None, help="images per sampling batch (default 16)")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="Euler steps measured, times scaled to 50 (default 50 on cuda, 4 on cpu)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--official-tp", type=int, default=2, choices=[1, 2],
                   help="pretraining_tp of the official expert MLP (the official code hard-codes 2)")
    p.add_argument("--mfu-model", default=None, help="default DiT-MoE-XL/2-8E2A")
    p.add_argument("--mfu-batch", type=int, default=None, help="default 8 (halved on out-of-memory)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s for MFU (default: by GPU name)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<device>.json)")
    p.add_argument("--docs", type=Path, default=None, help="markdown file to update (default docs/performance.md; "
                                                           "not updated by --quick unless given)")
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc as it is; by default the process keeps freed memory for reuse, as "
                        "the ditmoe command does (ditmoe.cpu_allocator), for every contender alike")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_contender", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    q = a.quick
    a.repeats = a.repeats if a.repeats is not None else (1 if q else 3)
    # Timings on a shared machine move by 10-40% from minute to minute; the cheap layer rounds
    # can afford many more of them than the training and sampling rounds.
    a.layer_repeats = a.layer_repeats if a.layer_repeats is not None else (1 if q else 15)
    # On a GPU a batch of 8 images is launch-bound; 32 is a per-GPU training batch. On the CPU
    # the layer is timed at 8 images and at the training benchmark's 16 (the layer as it runs
    # in the training step whose speed is a target): per-step costs that do not grow with the
    # batch, such as casting every expert's weights, weigh twice as much at 8.
    default_batch = "2" if q else ("32" if a.device == "cuda" else "8,16")
    try:
        a.batch = [int(b) for b in str(a.batch or default_batch).split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch takes whole numbers separated by commas, e.g. 8 or 8,16; got {a.batch!r}")
    if not a.batch or min(a.batch) < 1:
        p.error(f"--batch needs at least one positive number of images; got {a.batch}")
    a.tokens = a.tokens or (16 if q else 256)
    a.model = a.model or ("debug" if q else "DiT-MoE-S/2-8E2A")
    a.train_batch = a.train_batch or (2 if q else 16)
    a.sample_batch = a.sample_batch or (2 if q else 16)
    a.sample_steps = a.sample_steps or (2 if q else (50 if a.device == "cuda" else 4))
    a.mfu_model = a.mfu_model or ("debug" if q else "DiT-MoE-XL/2-8E2A")
    a.mfu_batch = a.mfu_batch or (2 if q else 8)
    whole = [b for b in BENCHES if b != "mfu" or a.device == "cuda"]
    if a.only:
        a.only = [s.strip() for s in a.only.split(",") if s.strip()]
        bad = [s for s in a.only if s not in BENCHES]
        if bad:
            p.error(f"unknown --only {bad}; choose from {BENCHES}")
    else:
        a.only = whole
    a.partial = not set(whole) <= set(a.only)
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    if args._child == "memory":
        memory_child(args)
        return {}
    device = torch.device(args.device)
    if not args.default_malloc:
        # The allocator setting of the `ditmoe` command, for all contenders in this process (the
        # memory benchmark's fresh processes pin their own setting).
        from ditmoe.cpu_allocator import keep_freed_memory

        args.malloc = "freed memory kept for reuse" if keep_freed_memory() else "default"
    else:
        args.malloc = "default"
    if device.type == "cuda":
        # As the official train.py: TF32 matmuls for the fp32 contenders.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dev = describe_device(device)
    argv_list = sys.argv[1:] if argv is None else argv
    env_prefix = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = env_prefix + "python benchmarks/moe_bench.py " + " ".join(shlex.quote(a) for a in argv_list)
    log(f"device: {dev['description']}")
    log(f"command: {command.strip()}")
    checks = Checks()
    results: dict[str, Any] = {}
    runners = {"layer": bench_layer, "train": bench_train, "sample": bench_sample, "memory": bench_memory,
               "compile": bench_compile, "mfu": bench_mfu}
    suffix = "-quick" if args.quick else ("-partial" if args.partial else "")
    out = args.out or (HERE / "results" / f"{dev['slug']}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": dev, "command": command.strip(), "quick": args.quick, "repeats": args.repeats,
        "warmup": args.warmup, "timestamp": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if not k.startswith("_")},
        "targets": TARGETS, "results": results, "checks": checks.items, "complete": False,
        "precision_auto": describe_precision(device, args.model),
    }
    t_start = time.perf_counter()
    for name in args.only:
        t0 = time.perf_counter()
        results[name] = runners[name](args, device, checks)
        log(f"  ({name} took {time.perf_counter() - t0:.1f} s)")
        report["elapsed_s"] = time.perf_counter() - t_start
        # Written after every benchmark, so an interrupted run still leaves what it measured.
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    report["complete"] = True
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    log(f"wrote {out}")
    docs = args.docs if args.docs is not None else (None if args.quick or args.partial else ROOT / "docs" / "performance.md")
    if docs is not None and not args.no_docs:
        update_docs(docs, report)
        log(f"updated {docs}")
    log("summary:")
    for c in checks.items:
        log("  " + c["line"])
    return report


if __name__ == "__main__":
    main()
