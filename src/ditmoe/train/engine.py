"""The trainer's engine: what happens to a built model between the loss and the next step.

The trainer computes the loss of each micro-batch and does the rest through one interface,
`Engine`: the backward (with loss scaling and the gradient reduction of the layout), the optimizer
step (unscaling, clipping, zeroing), the EMA, and single-process full states for checkpoints.
Two implementations:

- `TorchEngine`: PyTorch's own pieces, for one process and the `torch.distributed` layouts
  (DDP, FSDP2, expert parallelism): `parallel.wrap_model`, AdamW, a `GradScaler` for fp16, `EMA`;
- `parallel.deepspeed_engine.DeepSpeedEngine` (ZeRO-2 / ZeRO-3): DeepSpeed owns the optimizer,
  the loss scaling and the gradient reduction; the EMA is sharded like the optimizer state.

`build_engine` picks one from `TrainConfig.parallel`. Either starts from a checkpoint's full
states when given one, so a run saved under one layout resumes under any other.
"""

from __future__ import annotations

from typing import Any, ContextManager, Protocol

import torch

from ..config import TrainConfig
from .ema import EMA


class Engine(Protocol):
    """One layout's backward, optimizer step, EMA and full states, as the trainer uses them.

    Per global batch the trainer runs, for each of its `count` micro-batches,
    `with engine.micro_batch(last): loss = ...; engine.backward(loss, count, last)`, then
    `engine.step()` and `engine.ema.update(model, step)`.
    """

    model: torch.nn.Module  # the model as built (sharded in place by some layouts), never wrapped
    train_model: torch.nn.Module  # what the loss runs through: `model` itself or its wrapper
    optimizer: torch.optim.Optimizer  # its param_groups take the scheduled learning rate
    ema: Any  # update(model, step) after every optimizer step
    scaler: torch.amp.GradScaler  # the fp16 loss scaler of the backward (disabled where the engine scales itself)

    def micro_batch(self, last: bool) -> ContextManager:
        """Context around one micro-batch's forward and backward; `last` marks the global batch's last."""

    def backward(self, loss: torch.Tensor, count: int, last: bool) -> None:
        """Backward of one of `count` micro-batches' loss, so the gradients sum to those of the mean loss."""

    def step(self) -> torch.Tensor | None:
        """Clip, step the optimizer and clear the gradients; the global grad norm before clipping, if measured."""

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The single-process state dict of the live weights (collective under sharded layouts)."""

    def full_ema_state(self) -> dict[str, torch.Tensor]:
        """The single-process state dict of the EMA weights (collective under sharded layouts)."""

    def full_optimizer_state(self) -> dict[str, Any]:
        """The optimizer state as one process's AdamW holds it (collective under sharded layouts)."""

    def whole_ema_model(self) -> torch.nn.Module | None:
        """The EMA model where every rank holds all of it (previews sample it as it is), else None."""


def build_optimizer(params: Any, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, with torch's fused kernel where the parameters are plain tensors on a CPU or GPU.

    The fused step reads and writes each tensor once instead of once per elementwise op: on a
    2-core CPU it stepped DiT-MoE-S/2's 199M parameters about 7 times faster than the default
    loop. FSDP and expert parallelism hold DTensor / resharded parameters: they keep the default.
    """
    fused = device.type in ("cpu", "cuda") and cfg.parallel in ("none", "ddp")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}))


class TorchEngine:
    """One process, DDP, FSDP2 or expert parallelism: `parallel.wrap_model`, AdamW, EMA, GradScaler.

    Each micro-batch loss is divided by the accumulation count before the (fp16) loss scaling.
    DDP reduces gradients on the last micro-batch only; FSDP reduces every one (`no_sync_if`).
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, dist: Any, autocast_dtype: torch.dtype | None,
                 resume: dict[str, Any] | None = None):
        from ..parallel import load_full_model_state, load_full_optimizer_state, shard_ema, wrap_model

        self.model, self.parallel, self.grad_clip = model, cfg.parallel, cfg.grad_clip
        # The EMA copies the model before wrapping; shard_ema then gives it the wrapped layout.
        self.ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup)
        self.train_model = wrap_model(model, cfg.parallel, dist, ep_size=cfg.ep_size, param_dtype=autocast_dtype)
        shard_ema(self.ema.model, model, cfg.parallel)  # each rank keeps the EMA of its own shard
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        # Built after wrapping, over the model's own parameters: FSDP and expert parallelism replace them.
        self.optimizer = build_optimizer(model.parameters(), cfg, dist.device)
        # Loss scaling only matters for fp16; for bf16 / fp32 the scaler is a pass-through.
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=autocast_dtype == torch.float16)
        if resume is not None and resume["_sharded"]:  # each rank reads the shards it holds
            from ..parallel.sharded import load_sharded

            load_sharded(resume["_path"], model, self.ema.model, self.optimizer)
        elif resume is not None:
            load_full_model_state(model, resume["model"], cfg.parallel)
            load_full_model_state(self.ema.model, resume["ema"], cfg.parallel)
            load_full_optimizer_state(model, self.optimizer, resume["optimizer"], cfg.parallel)

    def micro_batch(self, last: bool) -> ContextManager:
        from ..parallel import no_sync_if

        return no_sync_if(self.train_model, not last)

    def backward(self, loss: torch.Tensor, count: int, last: bool) -> None:
        self.scaler.scale(loss / count).backward()

    def step(self) -> torch.Tensor | None:
        self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.grad_clip > 0:
            from ..parallel import clip_grad_norm_

            grad_norm = clip_grad_norm_(self.model, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def full_model_state(self) -> dict[str, torch.Tensor]:
        from ..parallel import full_model_state

        return full_model_state(self.model, self.parallel)

    def full_ema_state(self) -> dict[str, torch.Tensor]:
        from ..parallel import full_model_state

        return full_model_state(self.ema.model, self.parallel)

    def full_optimizer_state(self) -> dict[str, Any]:
        from ..parallel import full_optimizer_state

        return full_optimizer_state(self.model, self.optimizer, self.parallel)

    def whole_ema_model(self) -> torch.nn.Module | None:
        return self.ema.model if self.parallel in ("none", "ddp") else None


def build_engine(model: torch.nn.Module, cfg: TrainConfig, dist: Any, micro_batch: int, accum: int,
                 autocast_dtype: torch.dtype | None, resume: dict[str, Any] | None = None) -> Engine:
    """The engine of `cfg.parallel` around `model`, started from a checkpoint's full states when
    `resume` (with its "model", "ema" and "optimizer") is given. `dist` carries rank, world and device."""
    from ..parallel.deepspeed_engine import DEEPSPEED_MODES

    if cfg.parallel in DEEPSPEED_MODES:
        from ..parallel.deepspeed_engine import DeepSpeedEngine

        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]
        return DeepSpeedEngine(model, cfg, dist.device, micro_batch, accum, dist.world, precision, resume)
    return TorchEngine(model, cfg, dist, autocast_dtype, resume)


__all__ = ["Engine", "TorchEngine", "build_engine", "build_optimizer"]
