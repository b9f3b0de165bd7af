"""DeepSpeed ZeRO-2 / ZeRO-3 as an optional training engine (`ditmoe train --parallel zero2|zero3`):
`DeepSpeedEngine`, the trainer's `train.engine.Engine` for these layouts.

`deepspeed` is imported here only, and only when one of these layouts is chosen
(`pip install 'ditmoe[deepspeed]'`). The rest of the trainer stays the same: data order, loss,
balance loss, learning-rate schedule and checkpoint format. What this engine keeps that the
official DeepSpeed script drops:

- an EMA of the weights, kept by every rank over its own fp32 partition (`ShardedEMA`), so under
  ZeRO-3 the EMA is sharded like the optimizer state instead of costing a full model per rank;
- the balance loss inside the loss DeepSpeed scales, so loss scaling and gradient accumulation
  apply to it as to the diffusion loss;
- checkpoints in the single-process format (model, EMA, AdamW state keyed by parameter index),
  so a run saved under ZeRO resumes under DDP, FSDP, expert parallelism or one process, and back.

Precision: parameters and master weights stay fp32 and bf16 / fp16 run through DeepSpeed's
`torch_autocast` (fp16 with its gradient scaler), which is what the trainer's other layouts do.
A user's DeepSpeed JSON (`--deepspeed-config`) is merged over the generated one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

DEEPSPEED_MODES = ("zero2", "zero3")
# The batch keys DeepSpeed reads; they must agree with the trainer's global / micro batch.
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def import_deepspeed(device_type: str):
    """Import deepspeed, choosing its CPU accelerator when there is no GPU."""
    if device_type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(
            "--parallel zero2 / zero3 needs DeepSpeed: pip install 'ditmoe[deepspeed]' (with a CPU-only torch "
            "add --no-build-isolation, or pip fetches a CUDA torch just to build DeepSpeed)") from e
    if device_type != "cuda":
        _optional_shared_memory_op()
    return deepspeed


def _optional_shared_memory_op() -> None:
    """On CPUs DeepSpeed compiles a shared-memory all-reduce at start-up (needs gcc and the Python
    headers); it only speeds up collectives, so where it cannot be built use torch.distributed's."""
    import importlib

    # by module path: `deepspeed.comm.torch` as an attribute is the torch package itself
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")

    build = ds_torch_comm.build_shm_op
    if getattr(build, "_ditmoe_optional", False):
        return

    def build_or_skip():
        try:
            return build()
        except Exception as e:  # noqa: BLE001 - any build failure means: no shared-memory op
            print(f"DeepSpeed's shared-memory collectives could not be built ({type(e).__name__}); using gloo's")
            return None

    build_or_skip._ditmoe_optional = True
    ds_torch_comm.build_shm_op = build_or_skip


def deepspeed_config(stage: int, *, micro_batch: int, accum: int, world: int, lr: float,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                     grad_clip: float = 0.0, precision: str = "fp32", offload: bool = False,
                     device_type: str = "cuda") -> dict[str, Any]:
    """A DeepSpeed config with the official ZeRO settings and this run's batch and optimizer.

    Stage 2 matches the official zero2.json (overlapped, contiguous gradients, sub-groups of 1e9),
    stage 3 zero3.json (plus 1e9 live parameters and reuse distance, 16-bit weights gathered on
    save), `offload` zero3_offload.json (optimizer state and parameters in pinned host memory).
    fp16 uses a dynamic loss scale starting at 2^16, as the official configs do.
    """
    if stage not in (2, 3):
        raise ValueError(f"ZeRO stage must be 2 or 3, got {stage}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16 under DeepSpeed, got {precision!r}")
    on_gpu = device_type == "cuda"
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": on_gpu,  # overlap needs CUDA streams
                            "contiguous_gradients": True, "sub_group_size": 1e9}
    if stage == 3:
        zero.update(stage3_max_live_parameters=1e9, stage3_max_reuse_distance=1e9,
                    stage3_gather_16bit_weights_on_model_save=True)
    if offload:
        zero.update(offload_optimizer={"device": "cpu", "pin_memory": on_gpu},
                    offload_param={"device": "cpu", "pin_memory": on_gpu} if stage == 3 else None)
        if zero["offload_param"] is None:
            del zero["offload_param"]
    cfg: dict[str, Any] = {
        "train_batch_size": micro_batch * accum * world,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum,
        "optimizer": {"type": "AdamW", "params": {
            "lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay,
            # FusedAdam is a CUDA kernel; elsewhere DeepSpeed's torch.optim.AdamW path
            **({} if on_gpu else {"torch_adam": True})}},
        "zero_optimization": zero,
        "gradient_clipping": grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision != "fp32":
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16"}
    return cfg


def merge_config(base: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """`user` over `base`, recursively; batch keys must agree with the trainer's."""
    out = copy.deepcopy(base)
    for k, v in user.items():
        if k in _BATCH_KEYS and k in base and v != base[k]:
            raise ValueError(f"the DeepSpeed config sets {k}={v} but this run has {k}={base[k]}; set the batch "
                             "with --global-batch / --micro-batch and drop it from the JSON")
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_user_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist")
    text = p.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        import hjson  # a DeepSpeed dependency; reads the trailing commas the official files have

        return json.loads(json.dumps(hjson.loads(text)))


# ------------------------------------------------------------------------- partitions
def _fp32_partitions(optimizer: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions (ZeRO-1/2 and ZeRO-3 name them differently)."""
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        parts = getattr(optimizer, attr, None)
        if parts:
            return list(parts)
    raise RuntimeError(f"{type(optimizer).__name__} exposes no fp32 partitions; use ZeRO stage 2 or 3")


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class ShardedEMA:
    """EMA over this rank's fp32 partitions: the same per-element update as `train.ema.EMA`.

    Frozen parameters never change, so their EMA is the live value; so are the buffers, which is
    what the routers' state (topk_bias's bias, thresholds) needs: copied, not averaged. Reading or
    writing full tensors swaps the EMA into the master partitions for a moment and lets
    DeepSpeed's own gather / scatter do the layout (collective: every rank calls it).
    """

    def __init__(self, engine: Any, decay: float, warmup: bool):
        self.engine, self.decay, self.warmup = engine, decay, warmup
        self.flats = [p.detach().clone() for p in _fp32_partitions(engine.optimizer)]

    def decay_at(self, step: int) -> float:
        from ..train.ema import ema_decay_at

        return ema_decay_at(self.decay, self.warmup, step)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        decay = self.decay if step is None else self.decay_at(step)
        torch._foreach_lerp_(self.flats, [p.detach() for p in _fp32_partitions(self.engine.optimizer)], 1.0 - decay)

    @torch.no_grad()
    def _swapped(self, fn):
        parts = _fp32_partitions(self.engine.optimizer)
        saved = [p.detach().clone() for p in parts]
        for p, e in zip(parts, self.flats):
            p.copy_(e)
        try:
            return fn()
        finally:
            for p, s in zip(parts, saved):
                p.copy_(s)

    def full_state(self) -> dict[str, torch.Tensor]:
        return self._swapped(lambda: full_model_state(self.engine))

    def load_full_state(self, sd: dict[str, torch.Tensor]) -> None:
        def load():
            set_master_weights(self.engine, sd)
            return [p.detach().clone() for p in _fp32_partitions(self.engine.optimizer)]

        self.flats = self._swapped(load)


# ------------------------------------------------------------------------- full states
def _gathered(engine: Any, params: list[nn.Parameter]):
    """Context that makes ZeRO-3 partitioned parameters whole (a no-op under ZeRO-2)."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


def _is_writer() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def full_model_state(engine: Any) -> dict[str, torch.Tensor]:
    """The single-process state dict on rank 0's CPU, trainable weights from the fp32 masters.

    Collective: every rank takes part in each gather, one parameter at a time (the whole model
    never sits on a GPU); only rank 0, the checkpoint writer, keeps the tensors, the others get {}.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    model, keep = engine.module, _is_writer()
    out = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for n, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)
            else:  # frozen (the position table): no master copy, gather the working one
                with _gathered(engine, [p]):
                    full = p.detach().clone()
            if keep:
                out[prefix + n] = full.to("cpu", torch.float32, copy=True)
            del full
        if keep:
            for n, b in module.named_buffers(recurse=False):
                if n not in module._non_persistent_buffers_set:
                    out[prefix + n] = b.detach().to("cpu", copy=True)
    return {k: out[k] for k in model.state_dict()} if keep else {}  # the module's own key order


def set_master_weights(engine: Any, sd: dict[str, torch.Tensor]) -> None:
    """Write full trainable weights into the fp32 masters (collective; the working copies follow
    at the next step's all-gather, so only the EMA and a fresh engine use this)."""
    from deepspeed.utils import safe_set_full_fp32_param

    for n, p in _trainable(engine.module):
        if n not in sd:
            raise KeyError(f"state dict has no {n!r}")
        safe_set_full_fp32_param(p, sd[n].to(p.device, torch.float32))


def _base_optimizer(engine: Any) -> torch.optim.Optimizer:
    return engine.optimizer.optimizer


def full_optimizer_state(engine: Any, hyper: dict[str, Any]) -> dict[str, Any]:
    """AdamW state as one process's `torch.optim.AdamW(model.parameters()).state_dict()` holds it
    (collective; rank 0 keeps it, the others get {})."""
    from deepspeed.utils import safe_get_full_optimizer_state

    model = engine.module
    params = list(model.parameters())
    template = torch.optim.AdamW(params, **hyper).state_dict()  # the param_groups of a single process
    base = _base_optimizer(engine)
    steps = [s["step"] for s in base.state.values() if "step" in s]
    state, keep = {}, _is_writer()
    if steps:
        step = torch.as_tensor(steps[0], dtype=torch.float32).detach().cpu().clone()
        for i, p in enumerate(params):
            if not p.requires_grad:
                continue
            moments = {key: safe_get_full_optimizer_state(p, key) for key in ("exp_avg", "exp_avg_sq")}  # collective
            if keep:
                state[i] = {"step": step.clone(), **{k: v.detach().float().cpu() for k, v in moments.items()}}
    return {"state": state, "param_groups": template["param_groups"]} if keep else {}


def load_full_optimizer_state(engine: Any, sd: dict[str, Any]) -> None:
    """Load a single-process AdamW state dict into the ZeRO partitions (collective)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    if not sd.get("state"):
        return  # saved before the first step: nothing to restore
    params = list(engine.module.parameters())
    base = _base_optimizer(engine)
    step = next(iter(sd["state"].values()))["step"]
    # torch's AdamW creates its state lazily at the first step; create it now so it can be filled.
    # It is keyed by the flat fp32 partitions (ZeRO-3 swaps them into the param groups only while
    # it steps, so the groups are not the place to find them).
    for flat in _fp32_partitions(engine.optimizer):
        s = base.state[flat]
        s["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in s:
                s[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2 map parameters to optimizer-state fragments after the first step
        link()
    for i, p in enumerate(params):
        if not p.requires_grad:
            continue
        st = sd["state"].get(i) if i in sd["state"] else sd["state"].get(str(i))
        if st is None:
            raise KeyError(f"optimizer state has no entry for parameter {i}")
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, st[key].to(p.device, torch.float32), key)


def is_deepspeed_model(model: nn.Module) -> bool:
    """Whether a ZeRO engine manages `model`'s parameters (stage 3 tags them with ds_id, 1/2 link them)."""
    return any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in model.parameters())


def full_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter's reduced gradient, whole (collective; after the boundary backward)."""
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for n, p in _trainable(model):
        g = safe_get_full_grad(p)
        if g is not None:
            out[n] = g.detach().float().cpu().clone()
    return out


# ------------------------------------------------------------------------- the engine
class DeepSpeedEngine:
    """The trainer's `train.engine.Engine` under a DeepSpeed ZeRO engine (`self.engine`).

    DeepSpeed counts micro-steps itself: every backward is followed by `engine.step()`, which
    steps the optimizer (clipping and fp16 loss scaling included) only at the accumulation
    boundary. The loss is not divided by the accumulation count here: DeepSpeed does that.
    """

    def __init__(self, model: nn.Module, cfg: Any, device: torch.device, micro_batch: int, accum: int,
                 world: int, precision: str, resume: dict[str, Any] | None = None):
        self.deepspeed = import_deepspeed(device.type)
        if resume is not None:  # the engine copies its fp32 masters from the module's weights
            from ..weights_io import load_into

            load_into(model, resume["model"])
        stage = int(cfg.parallel[-1])
        ds_cfg = deepspeed_config(stage, micro_batch=micro_batch, accum=accum, world=world, lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                                  grad_clip=cfg.grad_clip, precision=precision, offload=cfg.deepspeed_offload,
                                  device_type=device.type)
        if cfg.deepspeed_config:
            ds_cfg = merge_config(ds_cfg, load_user_config(cfg.deepspeed_config))
        self.hyper = {"lr": cfg.lr, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": 1e-8,
                      "weight_decay": cfg.weight_decay}
        self.model = model
        self.engine, self.optimizer, _, _ = self.deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_cfg)
        self.train_model = self.engine
        self.ema = ShardedEMA(self.engine, cfg.ema_decay, cfg.ema_warmup)
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)  # DeepSpeed scales fp16 itself
        if resume is not None:
            self.ema.load_full_state(resume["ema"])
            load_full_optimizer_state(self.engine, resume["optimizer"])

    def micro_batch(self, last: bool):
        """DeepSpeed reduces the gradients itself at the boundary: nothing to do around a micro-batch."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, count: int, last: bool) -> None:
        """Backward of one micro-batch's loss (DeepSpeed divides by the count); `last` marks the boundary."""
        self.engine.backward(loss)
        if not last:
            self.engine.step()  # bookkeeping only: DeepSpeed steps at the boundary

    def step(self) -> torch.Tensor | None:
        """The optimizer step (the boundary micro-step); returns the pre-clip global grad norm."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(float(norm))

    def full_model_state(self) -> dict[str, torch.Tensor]:
        return full_model_state(self.engine)

    def full_ema_state(self) -> dict[str, torch.Tensor]:
        return self.ema.full_state()

    def full_optimizer_state(self) -> dict[str, Any]:
        hyper = {**self.hyper, "lr": self.optimizer.param_groups[0]["lr"]}
        return full_optimizer_state(self.engine, hyper)

    def whole_ema_model(self) -> nn.Module | None:
        return None  # the EMA lives in each rank's fp32 partitions


__all__ = ["DEEPSPEED_MODES", "DeepSpeedEngine", "ShardedEMA", "deepspeed_config", "merge_config",
           "load_user_config", "import_deepspeed", "full_model_state", "full_optimizer_state",
           "load_full_optimizer_state", "full_gradients", "is_deepspeed_model", "set_master_weights"]
