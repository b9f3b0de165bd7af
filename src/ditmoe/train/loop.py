"""The training loop: one code path from a laptop CPU to torchrun on several nodes.

Per optimizer step ("global batch") every process runs `accum` micro-batches, each loss scaled by
1/accum, and the optimizer and the EMA step once. The balance loss is added to the diffusion loss
before any scaling, so its gradient is alpha times the analytic one at any accumulation count or
loss scale (the official code injects it with a fixed weight of 1 behind the scaler's back).

Data order is a pure function of (seed, step): global position p = step * global_batch + i reads
item perm_e[p mod N] of the per-epoch permutation e = p // N, so resuming at step s continues
exactly where the run stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..config import STATEFUL_ROUTERS, ModelConfig, TrainConfig
from .. import kernels
from ..devices import resolve_device
from ..registry import create_model, get_config
from ..weights_io import atomic_write_json
from .checkpoint import (STATE_BYTES_PER_PARAM, choose_format, is_sharded, list_checkpoints, load_checkpoint,
                         read_sharded_header, resolve_resume, rng_state, save_checkpoint, save_sharded_checkpoint,
                         set_rng_state)
from .engine import Engine, build_engine
from .progress import ExpertLoadTracker, Progress, RunLogger
from .rundir import RunLock, check_fresh_run, clean_temp_files, clear_run, prepare_out_dir


# ----------------------------------------------------------------------------- data order
class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of indices, step by step, from `start_step` on."""

    def __init__(self, n: int, global_batch: int, micro_batch: int, rank: int, world: int, seed: int,
                 start_step: int, steps: int):
        if global_batch % world or (global_batch // world) % micro_batch:
            raise ValueError(f"global_batch {global_batch} must split into {world} processes x micro_batch {micro_batch}")
        self.n, self.g, self.mb, self.rank, self.world = n, global_batch, micro_batch, rank, world
        self.seed, self.start, self.steps = seed, start_step, steps
        self._perm_epoch, self._perm = -1, None

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=gen), epoch
        return self._perm

    def global_indices(self, step: int) -> list[int]:
        out = []
        for p in range(step * self.g, (step + 1) * self.g):
            out.append(int(self._perm_for(p // self.n)[p % self.n]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.g // self.world
        for step in range(self.start, self.steps):
            idx = self.global_indices(step)[self.rank * per_rank:(self.rank + 1) * per_rank]
            for i in range(0, per_rank, self.mb):
                yield idx[i:i + self.mb]

    def __len__(self) -> int:
        return (self.steps - self.start) * (self.g // self.world // self.mb)


# ------------------------------------------------------------------------------ set-up
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_launch(parallel: str) -> None:
    """ValueError, with the torchrun command, where a parallel layout is asked for outside torchrun.

    Every layout but "none" joins a torch.distributed world whose rank, size and rendezvous
    torchrun passes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
    """
    world_text = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(world_text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={world_text!r} in the environment is not an integer; unset it or launch "
                         "with torchrun, which sets it") from None
    if parallel == "none" and world > 1 and "RANK" not in os.environ:
        raise ValueError(f"WORLD_SIZE={world} is set in the environment but RANK is not: launch with torchrun "
                         "(it sets both), or unset WORLD_SIZE to train in one process")
    if parallel != "none" and "RANK" not in os.environ:
        raise ValueError(
            f"--parallel {parallel} runs one process per device under torchrun, which sets RANK and WORLD_SIZE "
            f"(RANK is not set here). Launch e.g. `torchrun --standalone --nproc_per_node 2 -m ditmoe train --parallel "
            f"{parallel} ...` (--nproc_per_node 1 runs the layout in one process), or train in one process "
            "with --parallel none")


def init_distributed(parallel: str) -> DistInfo:
    """Join the torchrun world (if any). Ranks come from RANK / WORLD_SIZE, never LOCAL_RANK."""
    check_launch(parallel)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none" and world > 1:
        parallel = "ddp"
    dev = resolve_device()  # under torchrun with CUDA: cuda:LOCAL_RANK
    if world == 1 and parallel == "none":
        return DistInfo(device=dev)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def choose_precision(precision: str, device: torch.device, model_cfg: ModelConfig) -> torch.dtype | None:
    """Autocast dtype, or None for fp32: `ditmoe.precision.resolve_precision` (for "auto", bf16 on
    CUDA; on CPU what the machine's bf16 instructions and a cached probe say), every rank of a
    CPU process group taking rank 0's choice."""
    from ..precision import resolve_precision

    return resolve_precision(precision, device, model_cfg, sync_ranks=True)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up, then constant, or a
    decay that reaches cfg.lr_final at the last step (cfg.steps - 1)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "none":
        return cfg.lr
    span = max(1, round(cfg.lr_decay_fraction * (cfg.steps - cfg.warmup_steps)))
    frac = min(1.0, max(0.0, (step - (cfg.steps - 1 - span)) / span))  # 0 before the decay, 1 at the last step
    if cfg.lr_decay == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return cfg.lr + (cfg.lr_final - cfg.lr) * frac


def build_process(cfg: TrainConfig, model_cfg: ModelConfig):
    if cfg.process == "flow":
        from ..diffusion.flow import RectifiedFlow

        return RectifiedFlow(cfg.time_dist, cfg.time_mean, cfg.time_std, prediction=model_cfg.flow_prediction)
    if model_cfg.flow_prediction != "velocity":
        raise ValueError(f"flow_prediction {model_cfg.flow_prediction} is for flow models; a ddpm model predicts the "
                         "noise: drop --model-flow-prediction or train with --process flow")
    from ..diffusion.gaussian import create_diffusion

    return create_diffusion(None, noise_schedule=cfg.noise_schedule, diffusion_steps=cfg.diffusion_steps,
                            learn_sigma=model_cfg.learn_sigma)


def resolve_model_config(cfg: TrainConfig, model_overrides: dict[str, Any], data_info: Any) -> ModelConfig:
    """Registry config + the data's channels / classes + process defaults + the user's overrides."""
    base = get_config(cfg.model)
    auto: dict[str, Any] = {"in_channels": data_info.channels, "num_classes": data_info.num_classes}
    if cfg.process == "flow":
        # Flows trained here embed t * 1000 (same range as DDPM) and need no variance output.
        auto.update(timestep_scale=1000.0, learn_sigma=False)
    else:
        auto.update(timestep_scale=1.0)
    merged = {**auto, **model_overrides}
    model_cfg = base.replace(**merged).validate()
    if model_cfg.input_size != data_info.image_size:
        raise ValueError(
            f"model {cfg.model} expects {model_cfg.input_size}x{model_cfg.input_size} inputs but the data "
            f"({cfg.data}) gives {data_info.image_size}x{data_info.image_size}; set --model-input-size "
            f"{data_info.image_size} or use data of the model's size")
    return model_cfg


def _short_error(e: BaseException) -> str:
    """First line of an exception's message; torch's RuntimeErrors carry a C++ trace after it."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def describe_config_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(set(a) | set(b))
    diffs = [f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(diffs[:8])


# ------------------------------------------------------------------------------ trainer
class Trainer:
    """Builds everything from a TrainConfig and runs the loop. `run()` returns a summary dict."""

    def __init__(self, cfg: TrainConfig, model_overrides: dict[str, Any] | None = None):
        self.cfg = cfg.validate()
        self.dist = init_distributed(cfg.parallel)
        self.out = Path(cfg.out)
        self.lock: RunLock | None = None
        try:
            self._set_up(model_overrides)
        except BaseException:
            self.release()
            raise

    def _set_up(self, model_overrides: dict[str, Any] | None) -> None:
        cfg = self.cfg
        # The output folder and the checkpoint to resume from are checked before data and model
        # are built: a bad --out or --resume fails in a second, not after minutes of loading.
        self._claim_out_dir()
        resume_state = self._read_resume_state()
        check_fresh_run(self.out, cfg.resume, cfg.overwrite)
        from .init_from import read_init_source

        init_source = read_init_source(cfg.init_from, cfg.init_weights, self.out, cfg.overwrite) if cfg.init_from else None
        from ..data import build_dataset, folder_options

        # Image folders are resized to the model's input; read it from the registry before the
        # data exists (the data's channels and classes then fill in the rest).
        overrides = dict(model_overrides or {})
        size = overrides.get("input_size", get_config(cfg.model).input_size)
        self.dataset, self.data_info = build_dataset(cfg.data, image_size=size, flip=cfg.flip, **folder_options(
            cfg.data, cfg.allow_upscale, cfg.grayscale, cfg.verify_images))
        self.model_cfg = resolve_model_config(cfg, overrides, self.data_info)
        if resume_state is not None:
            self._check_resume_model(resume_state)
        self.process = build_process(cfg, self.model_cfg)

        world = self.dist.world
        micro = cfg.micro_batch or cfg.global_batch // world
        if cfg.global_batch < world:
            raise ValueError(f"global_batch {cfg.global_batch} is smaller than the {world} processes; each needs at "
                             f"least one image per step (--global-batch {world} or more)")
        if cfg.global_batch % (world * micro):
            raise ValueError(f"global_batch {cfg.global_batch} is not divisible by {world} processes x micro_batch {micro}")
        self.micro_batch = micro
        self.accum = cfg.global_batch // (world * micro)

        self.has_stateful_routers = self.model_cfg.is_moe and self.model_cfg.router in STATEFUL_ROUTERS
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        # The reference model with the speed layers (before the EMA copy, which then has them too).
        self.model = kernels.apply(create_model(self.model_cfg).to(self.dist.device))
        self.init_report = None
        if init_source is not None:  # before the EMA copy and any sharding: both start from these weights
            from .init_from import init_model

            self.init_report = init_model(self.model, init_source, self.model_cfg, cfg.process, log=self.dist.is_main)
            del init_source
        self.model.gradient_checkpointing = cfg.grad_checkpointing
        self.autocast_dtype = choose_precision(cfg.precision, self.dist.device, self.model_cfg)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())  # before any sharding
        self.checkpoint_format = choose_format(cfg.checkpoint_format, cfg.parallel, self.dist.world,
                                               STATE_BYTES_PER_PARAM * self.num_parameters, cfg.sharded_above_gb)
        self.step = 0
        # Per-rank noise stream, checkpointed with the rest of the RNG state.
        self.noise_gen = torch.Generator(self.dist.device).manual_seed(cfg.seed * 7919 + self.dist.rank + 1)
        # Layout, optimizer, loss scaling and EMA: PyTorch's or DeepSpeed's (train/engine.py).
        self.engine: Engine = build_engine(self.model, cfg, self.dist, micro, self.accum, self.autocast_dtype,
                                           resume_state)
        if cfg.balance_scope == "global" and self.dist.world > 1:
            from torch.distributed import group as process_groups

            from ..parallel import attach_global_balance

            attach_global_balance(self.model, process_groups.WORLD)  # after the EMA copy: groups are not copyable
        torch.manual_seed(cfg.seed + self.dist.rank)  # label dropout draws from the global RNG
        if resume_state is not None:
            self._restore_progress(resume_state)
        if cfg.overwrite and self.dist.is_main:  # only now: a run that fails to set up deletes nothing
            removed = clear_run(self.out)
            if removed:
                print(f"--overwrite: deleted the previous run's {removed} file(s) in {self.out}")

    def _claim_out_dir(self) -> None:
        """Check that --out is a writable folder, take its lock and clear leftovers of interrupted writes (rank 0)."""
        if self.dist.is_main:
            prepare_out_dir(self.out)
            self.lock = RunLock(self.out)
            removed = clean_temp_files(self.out)
            if removed:
                print(f"removed {removed} unfinished temporary file(s) that an interrupted write left in {self.out}")

    def release(self) -> None:
        """Give up the output folder's lock (the run is over; a later trainer may use the folder)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # The engine's parts the loop reaches: the module the loss runs through, the optimizer (its
    # param_groups take the scheduled lr), the EMA, and the fp16 loss scaler (replaceable, e.g. by
    # one with another initial scale).
    @property
    def train_model(self) -> torch.nn.Module:
        return self.engine.train_model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    @property
    def ema(self) -> Any:
        return self.engine.ema

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.engine.scaler

    @scaler.setter
    def scaler(self, scaler: torch.amp.GradScaler) -> None:
        self.engine.scaler = scaler

    # ------------------------------------------------------------------ checkpoints
    def _full_states(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        """Single-process model, EMA and optimizer state dicts (collective under sharded layouts)."""
        return self.engine.full_model_state(), self.full_ema_state(), self.engine.full_optimizer_state()

    def full_ema_state(self) -> dict[str, torch.Tensor]:
        return self.engine.full_ema_state()

    def _progress_state(self) -> dict[str, Any]:
        """Everything of a checkpoint but the tensor state: step, RNG streams, data position, configs."""
        return {
            "step": self.step,
            "weights_note": "'ema' holds the exponential moving average (decay %g); results use it" % self.cfg.ema_decay,
            "rng": rng_state(),
            "noise_gen": self.noise_gen.get_state(),
            "data_position": {"step": self.step, "seed": self.cfg.seed, "global_batch": self.cfg.global_batch},
            "train_config": json.dumps(self.cfg.to_dict()),
            "model_config": self.model_cfg.to_json(),
        }

    def _state(self) -> dict[str, Any]:
        model, ema, optimizer = self._full_states()
        return {"format": "ditmoe-train", "model": model, "ema": ema, "optimizer": optimizer, **self._progress_state()}

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (collective: every rank calls it); rank 0 gets its path."""
        previous = list_checkpoints(self.out) if self.dist.is_main else []
        try:
            if self.checkpoint_format == "sharded":
                side = {**self._progress_state(), "world_size": self.dist.world, "parallel": self.cfg.parallel}
                per_rank = {"rng": side.pop("rng"), "noise_gen": side.pop("noise_gen")}  # this rank's streams
                return save_sharded_checkpoint(self.out, self.step, self.model, self.ema.model, self.optimizer, side,
                                               per_rank, self.cfg.keep_last)
            state = self._state()  # collective under FSDP: every rank takes part
            if not self.dist.is_main:
                return None
            return save_checkpoint(self.out, self.step, state, self.cfg.keep_last)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write (full disk) as RuntimeError
            keep = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
            raise RuntimeError(f"writing the step-{self.step} checkpoint in {self.out / 'checkpoints'} failed "
                               f"({_short_error(e)}){keep}. Free disk space (check write access too) and resume "
                               "with --resume auto.") from e

    def _read_resume_state(self) -> dict[str, Any] | None:
        """The checkpoint to resume from, checked against this run's training config (None: fresh run).

        The training options that fix the data order and the process are compared first: a
        changed --process would otherwise show up as a model difference (timestep_scale).
        """
        path = resolve_resume(self.cfg.resume, self.out)
        if path is None:
            if self.cfg.resume == "auto" and self.dist.is_main:
                print(f"--resume auto: no checkpoint in {self.out / 'checkpoints'}; starting a new run at step 0")
            return None
        sharded = is_sharded(path)
        if sharded and self.cfg.parallel in ("zero2", "zero3"):
            raise ValueError(f"{path} is a sharded checkpoint, which the DeepSpeed layouts do not read; resume it with "
                             f"--parallel fsdp (or ep / ep_fsdp / none), or turn it into a file first with "
                             f"`ditmoe convert` (weights only) ")
        # A sharded checkpoint: only its side file here; every rank reads its shards once the
        # model has its layout (_build_torch).
        state = read_sharded_header(path) if sharded else load_checkpoint(path)
        state["_path"], state["_sharded"] = path, sharded
        saved_train = json.loads(state["train_config"])
        for key in ("process", "data", "global_batch", "seed"):
            if saved_train.get(key) != getattr(self.cfg, key):
                flag = "--" + key.replace("_", "-")
                raise ValueError(f"checkpoint {path} was trained with {key}={saved_train.get(key)!r} but this run has "
                                 f"{key}={getattr(self.cfg, key)!r}; an exact resume needs the same value "
                                 f"({flag} {saved_train.get(key)}), or start a new run in another --out")
        return state

    def _check_resume_model(self, state: dict[str, Any]) -> None:
        # Through ModelConfig: fields added since the checkpoint was written take their defaults.
        saved_model = ModelConfig.from_dict(json.loads(state["model_config"])).comparable()
        if saved_model != self.model_cfg.comparable():
            raise ValueError(f"checkpoint {state['_path']} was trained with another model config "
                             f"({describe_config_difference(saved_model, self.model_cfg.comparable())}); "
                             "resume with the same --model and overrides, or start a new run in another --out")

    def _restore_progress(self, state: dict[str, Any]) -> None:
        """Step, RNG streams and data position of a checkpoint whose weights are already loaded."""
        path = state["_path"]
        self.step = int(state["step"])
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == self.dist.world:  # sharded: every rank's own streams
            set_rng_state(per_rank[self.dist.rank])
            self.noise_gen.set_state(state["noise_gen_per_rank"][self.dist.rank])
        elif self.dist.world == 1:  # per-rank streams differ; a changed world size re-seeds them
            set_rng_state(state["rng"])
            self.noise_gen.set_state(state["noise_gen"])
        else:
            torch.manual_seed(self.cfg.seed * 31 + self.step * 1009 + self.dist.rank)
            self.noise_gen.manual_seed(self.cfg.seed * 7919 + self.step * 104729 + self.dist.rank + 1)
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ one step
    def draw_noise(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, device=x.device, generator=self.noise_gen)

    def draw_times(self, n: int, device: torch.device) -> torch.Tensor:
        if self.cfg.process == "flow":
            return self.process.sample_t(n, device, self.noise_gen)
        return self.process.sample_timesteps(n, device, self.noise_gen)

    def loss_terms(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Diffusion loss (batch mean), balance loss (sum over MoE layers) and their sum."""
        n, dev = x.shape[0], x.device
        t = self.draw_times(n, dev)
        noise = self.draw_noise(x)
        model = self.train_model

        def model_fn(xt, t, y):
            return model(xt, t, y, return_aux=True)

        with torch.autocast(dev.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            terms = self.process.training_losses(model_fn, x, t, noise=noise, model_kwargs={"y": y})
        diffusion = terms["loss"].float().mean()
        balance = terms["aux"].float().sum() if "aux" in terms and terms["aux"].numel() else diffusion.new_zeros(())
        return {"loss": diffusion + balance, "diffusion": diffusion, "balance": balance, "mse": terms["mse"].float().mean()}

    def accumulate(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Forward and backward over one global batch's micro-batches; returns the mean terms.

        Each micro-batch loss (diffusion + balance) goes to the engine's backward, which divides
        it by the accumulation count before any (fp16) loss scaling, so gradients equal those of
        one big batch.
        """
        totals: dict[str, torch.Tensor] = {}
        count = len(micro_batches)
        for micro, (x, y) in enumerate(micro_batches):
            x, y = x.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)
            last = micro == count - 1
            with self.engine.micro_batch(last):
                terms = self.loss_terms(x, y)
                self.engine.backward(terms["loss"], count, last)
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.detach() / len(micro_batches)
        return totals

    def optimizer_step(self) -> torch.Tensor | None:
        """Unscale, clip, step the optimizer (the engine) and the EMA once per global batch."""
        grad_norm = self.engine.step()
        # Before the EMA, which copies the routers' new state (DeepSpeed's sharded EMA reads the
        # live buffers).
        self.update_routers()
        self.ema.update(self.model, self.step)
        return grad_norm

    def update_routers(self) -> None:
        """Stateful routers (topk_bias's bias, race's threshold) move with the statistics of the whole
        global batch: every micro-batch of this process (accumulated in their buffers during the
        forwards) summed over the data-parallel processes."""
        if not self.has_stateful_routers:
            return
        from ..models.routers import update_routers

        reduce = None
        if self.dist.world > 1:
            from ..parallel import sum_over_processes

            reduce = sum_over_processes()
        update_routers(self.model, reduce)

    def _lr_at(self, step: int) -> float:
        return lr_at(self.cfg, step)

    # ------------------------------------------------------------------ previews
    def _preview_writer(self):
        """The run's PreviewWriter (every rank; only rank 0 writes), or None with sample_every 0."""
        if not self.cfg.sample_every:
            return None
        from .previews import PreviewWriter, latent_decoder

        decode = latent_decoder(self.data_info, self.dist.device) if self.data_info.is_latent else None
        return PreviewWriter(self.out, self.cfg.process, self.model_cfg.num_classes, self.autocast_dtype,
                             self.cfg.sampling(), decode)

    def _write_preview(self, previews, logger: RunLogger) -> None:
        """One preview grid from the EMA weights, written by rank 0.

        Where rank 0 holds the whole EMA model ("none" / "ddp") it samples it; the sharded layouts
        first gather the EMA state (a collective: every rank takes part) into a plain model kept on
        rank 0 for the next previews. Its creation and the sampling run inside the preview's RNG guard.
        """
        from .previews import preserved_rng

        whole = self.engine.whole_ema_model()
        if whole is not None:
            if self.dist.is_main:
                previews.write(whole, self.step, logger)
            return
        state = self.full_ema_state()
        if not self.dist.is_main:
            return
        if getattr(self, "_preview_model", None) is None:
            with preserved_rng():
                self._preview_model = kernels.apply(create_model(self.model_cfg).to(self.dist.device).eval())
        self._preview_model.load_state_dict(state)
        previews.write(self._preview_model, self.step, logger)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Train to cfg.steps, write the final checkpoint and EMA weights; the folder's lock is then given up."""
        try:
            return self._run()
        finally:
            self.release()

    def _run(self) -> dict[str, Any]:
        cfg, dist = self.cfg, self.dist
        sampler = StepBatchSampler(len(self.dataset), cfg.global_batch, self.micro_batch, dist.rank, dist.world,
                                   cfg.seed, self.step, cfg.steps)
        # The loader gets its own generator: creating its iterator must not consume the global RNG,
        # whose state the checkpoint restores.
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                             persistent_workers=cfg.num_workers > 0,
                                             generator=torch.Generator().manual_seed(cfg.seed))
        previews = self._preview_writer()  # before the logger: a latent run without its VAE fails here
        logger = RunLogger(self.out, enabled=dist.is_main, kind=cfg.logger, start_step=self.step,
                           config={"train": cfg.to_dict(), "model": self.model_cfg.to_dict()})
        if dist.is_main:
            atomic_write_json(self.out / "config.json", {"train": cfg.to_dict(), "model": self.model_cfg.to_dict()})
        tracker = ExpertLoadTracker(self.model)
        progress = Progress(cfg.steps, self.step, enabled=dist.is_main and cfg.progress)
        self.train_model.train()
        start_step, t_start = self.step, time.perf_counter()
        window_t, window_imgs = time.perf_counter(), 0
        sums = {"loss": 0.0, "diffusion": 0.0, "balance": 0.0, "mse": 0.0}
        n_in_window, last = 0, {}
        batches = iter(loader)
        with tracker:
            while self.step < cfg.steps:
                for group in self.optimizer.param_groups:
                    group["lr"] = self._lr_at(self.step)
                step_terms = self.accumulate([next(batches) for _ in range(self.accum)])
                grad_norm = self.optimizer_step()
                self.step += 1
                window_imgs += cfg.global_batch
                for k in sums:  # stays on the device: no host sync between log lines
                    sums[k] = sums[k] + step_terms[k]
                n_in_window += 1
                if (cfg.log_every and self.step % cfg.log_every == 0) or self.step == cfg.steps:
                    now = time.perf_counter()
                    last = {k: float(v) / n_in_window for k, v in sums.items()}
                    last["images_per_s"] = window_imgs / max(now - window_t, 1e-9)
                    last["lr"] = self._lr_at(self.step - 1)
                    if grad_norm is not None:
                        last["grad_norm"] = float(grad_norm)
                    loads = tracker.fractions_and_reset()
                    last["expert_load_cv"] = tracker.mean_cv(loads)
                    if self.model_cfg.is_moe and self.model_cfg.router != "topk_softmax":
                        from ..models.routers import router_statistics

                        last["unrouted_fraction"] = tracker.unrouted_fraction_and_reset()
                        last.update({f"router_{k}": v for k, v in router_statistics(self.model).items()})
                    logger.log(self.step, last, loads)
                    progress.set(last)
                    sums = {k: 0.0 for k in sums}
                    n_in_window, window_t, window_imgs = 0, now, 0
                if previews is not None and (self.step % cfg.sample_every == 0 or self.step == cfg.steps):
                    t_preview = time.perf_counter()
                    self._write_preview(previews, logger)
                    window_t += time.perf_counter() - t_preview  # images/s counts training time only
                progress.update(self.step)
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                    self.save()
        progress.close()
        ckpt = self.save()
        ema_state = self.full_ema_state()  # collective: every rank takes part
        elapsed = time.perf_counter() - t_start
        summary = {
            "steps": self.step, "steps_this_run": self.step - start_step, "seconds": elapsed,
            "images_per_s": (self.step - start_step) * cfg.global_batch / max(elapsed, 1e-9),
            "final": last, "checkpoint": str(ckpt) if ckpt else None,
            "precision": str(self.autocast_dtype or "fp32"), "accumulation": self.accum, "world_size": dist.world,
            "model": self.model_cfg.name, "parameters": self.num_parameters,
        }
        if previews is not None and previews.seconds:
            summary["previews"] = {"count": len(previews.seconds),
                                   "seconds_each": sum(previews.seconds) / len(previews.seconds)}
        if dist.is_main:
            from ..convert import save_model

            logger.close()
            try:
                save_model(ema_state, self.out / "model_ema.safetensors", config=self.model_cfg,
                           extra_meta={"weights": "ema", "process": cfg.process,
                                       "sampling": json.dumps(cfg.sampling())})
            except (OSError, RuntimeError) as e:
                raise RuntimeError(f"writing {self.out / 'model_ema.safetensors'} failed ({_short_error(e)}); the "
                                   f"checkpoint {ckpt} holds the same EMA weights. Free disk space and rerun with "
                                   "--resume auto to write them") from e
            if summary["steps_this_run"] == 0:  # a rerun of a finished job keeps the real summary
                print(f"already at step {self.step} of {cfg.steps}: nothing to train; "
                      f"EMA weights: {self.out / 'model_ema.safetensors'}")
                return summary
            atomic_write_json(self.out / "train_summary.json", summary)
            print(f"trained {summary['steps_this_run']} steps in {elapsed / 60:.1f} min "
                  f"({summary['images_per_s']:.0f} images/s, {summary['precision']}); final loss "
                  f"{last.get('loss', float('nan')):.4f}, balance loss {last.get('balance', float('nan')):.4f}; "
                  f"EMA weights: {self.out / 'model_ema.safetensors'}")
        return summary


def train(cfg: TrainConfig, model_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return Trainer(cfg, model_overrides).run()
