"""Typed configuration dataclasses: the single source of every model setting.

A `ModelConfig` fully describes one network (dense DiT or DiT-MoE). It is what the registry
returns, what checkpoints store as JSON, and what the CLI's `--model-*` flags are made from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

EXPERT_TYPES = ("swiglu", "gelu")
FLOW_PREDICTIONS = ("velocity", "data")
ATTN_LAYOUTS = ("qkv", "fused_qknorm")
MOE_PLACEMENTS = ("all", "every_other", "deep_half", "shallow_half", "none")
# Routing rules (ditmoe.models.routers; docs/routing.md) and their score functions.
ROUTERS = ("topk_softmax", "topk_bias", "expert_choice", "race", "token_pool", "prototype")
ROUTER_SCORES = ("auto", "softmax", "sigmoid")
# Routers with state that moves after each optimizer step (ditmoe.models.routers.update_routers).
STATEFUL_ROUTERS = ("topk_bias", "race", "token_pool")


def option(default: Any, help: str, choices: tuple[str, ...] | None = None, many: bool = False) -> Any:
    """A config field with its help text and, for enumerated options, the allowed values (`many`:
    a comma-separated list of them). `ditmoe train`'s flags are made from this metadata and the
    field's annotation; `validate()` checks the same `choices` for config files and Python callers."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if many:
        metadata["many"] = True
    return field(default=default, metadata=metadata)


def check_choices(cfg: Any) -> list[str]:
    """One problem per field whose value is not among its `choices` (each item, for `many` fields)."""
    problems = []
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices is None or not isinstance(value, str):
            continue
        words = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"  # 'fast', 'full' or 'none'
        if f.metadata.get("many"):
            items = [k.strip() for k in value.split(",") if k.strip()]
            if not items or any(k not in choices for k in items):
                problems.append(f"{f.name} {value!r} is not {words}, nor a comma-separated list of them "
                                f"(e.g. '{choices[1]},{choices[2]}')")
        elif value not in choices:
            problems.append(f"{f.name} {value!r} is not {words}")
    return problems


@dataclass
class ModelConfig:
    """Every hyper-parameter of a DiT / DiT-MoE network.

    Widths left as ``None`` follow the official code: routed experts are ``mlp_ratio * D`` wide,
    the shared expert ``2 * D`` (the official "2 shared experts"), dense MLPs ``mlp_ratio * D``.
    """

    name: str = option("custom", "registry name this config was made from")
    input_size: int = option(32, "latent (or pixel) height = width")
    patch_size: int = option(2, "patch side; tokens = (input_size / patch_size)^2")
    in_channels: int = option(4, "input channels (4 for SD latents, 1 for MNIST pixels)")
    hidden_size: int = option(1152, "transformer width D")
    depth: int = option(28, "number of DiT blocks")
    num_heads: int = option(16, "attention heads (divides hidden_size)")
    mlp_ratio: float = option(4.0, "MLP / routed expert width as a multiple of hidden_size")
    num_classes: int = option(1000, "class labels (label num_classes = no label, for guidance)")
    class_dropout_prob: float = option(0.1, "probability of dropping the label in training (classifier-free guidance)")
    learn_sigma: bool = option(True, "predict the variance too (DDPM; doubles the output channels)")
    # --- MoE ---
    num_experts: int = option(8, "routed experts per MoE layer; 0 makes every block dense")
    top_k: int = option(2, "experts chosen per token")
    norm_topk: bool = option(False, "renormalise the k chosen router weights to sum to 1")
    expert_hidden: int | None = option(None, "routed expert width; None = mlp_ratio * D")
    shared_hidden: int | None = option(None, "shared expert width; None = 2 * D; 0 = no shared expert")
    expert_type: str = option("swiglu", "routed expert MLP: swiglu (DiT-MoE experts) or gelu (original DiT MLP)",
                              choices=EXPERT_TYPES)
    dense_mlp_type: str = option("gelu", "MLP type of non-MoE blocks (DiT baselines use GELU-tanh)",
                                 choices=EXPERT_TYPES)
    aux_alpha: float | None = option(None, "balance-loss weight (paper Eq. 5); 0 disables it; None = the router's "
                                     "default (0.01 for topk_softmax, 0 for the other routers)")
    # --- routing (docs/routing.md) ---
    router: str = option("topk_softmax", "routing rule: topk_softmax (DiT-MoE), topk_bias (aux-loss-free bias, "
                         "DeepSeek-V3), expert_choice (per image, EC-DiT), race (global top-K, Expert Race), token_pool (batch "
                         "pool with a capacity predictor, DiffMoE), prototype (null-class tokens to the last expert, "
                         "the others by cosine to prototypes, ProMoE)",
                         choices=ROUTERS)
    router_score: str = option("auto", "router scores: softmax or sigmoid over the logits; auto = softmax for "
                               "topk_softmax, expert_choice and token_pool, sigmoid for topk_bias and race, the raw "
                               "cosine for prototype",
                               choices=ROUTER_SCORES)
    capacity_factor: float = option(1.0, "expert_choice: each expert takes ceil(capacity_factor * tokens per image "
                                    "* top_k / num_experts) tokens of every image (at most all of them); token_pool: "
                                    "the same over all tokens of the batch, in training")
    capacity_warmup_steps: int = option(0, "token_pool: the capacity factor starts at num_experts (every expert takes "
                                        "every token) and decays linearly to capacity_factor over this many optimizer "
                                        "steps (DiffMoE's optional schedule); 0 = off")
    bias_update_rate: float = option(1e-3, "topk_bias: the bias moves by this times sign(mean load - load) after "
                                     "each optimizer step")
    route_scale: float = option(1.0, "topk_bias: gate weights (after the optional norm_topk) are multiplied by this")
    contrastive_weight: float = option(1.0, "prototype: weight of the routing contrastive loss; 0 disables it")
    contrastive_temperature: float = option(0.07, "prototype: temperature of the routing contrastive loss")
    similarity_weight: float = option(0.0, "race: weight of the router-similarity loss (Race-DiT; the balance loss "
                                      "over pairs of experts chosen together); 0 disables it")
    threshold_decay: float = option(0.99, "race, token_pool: EMA decay of the inference threshold(s) towards the "
                                    "training cut-off (updated once per optimizer step)")
    moe_placement: str = option("all", "which blocks carry a MoE layer (the paper's placement ablation)",
                                choices=MOE_PLACEMENTS)
    # --- attention ---
    attn_layout: str = option("qkv", "qkv: timm qkv/proj (S, B); fused_qknorm: Wqkv + q/k LayerNorm (XL, G)",
                              choices=ATTN_LAYOUTS)
    # --- time conditioning ---
    # DDPM feeds step indices in [0, 999] (scale 1); the released rectified-flow checkpoints feed
    # t in (0, 1) unscaled (scale 1); flows trained here use 1000 so the sinusoid sees the same
    # range as DDPM.
    timestep_scale: float = option(1.0, "the model embeds t * timestep_scale (1 for DDPM and the released "
                                   "flow checkpoints, 1000 for flows trained here)")
    # --- what the network predicts (flow models) ---
    flow_prediction: str = option("velocity", "flow models: the network outputs the velocity noise - x0 (the "
                                  "paper's), or data: the clean image x0, turned into the velocity (x_t - x0) / t",
                                  choices=FLOW_PREDICTIONS)

    # ------------------------------------------------------------------ derived
    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return self.tokens()

    def tokens(self, image_size: int | None = None, vae_downsample: int = 1) -> int:
        """Tokens per image: (latent side / patch_size)^2, the latent side being image_size /
        vae_downsample (default: the model's own input_size). The one token count of the package."""
        side = self.input_size if image_size is None else image_size // vae_downsample
        return (side // self.patch_size) ** 2

    @property
    def routed_hidden(self) -> int:
        return self.expert_hidden if self.expert_hidden is not None else int(self.mlp_ratio * self.hidden_size)

    @property
    def shared_width(self) -> int:
        return self.shared_hidden if self.shared_hidden is not None else 2 * self.hidden_size

    @property
    def dense_hidden(self) -> int:
        return int(self.mlp_ratio * self.hidden_size)

    @property
    def balance_alpha(self) -> float:
        """The balance-loss weight in force: aux_alpha, or the router's default where it is None."""
        if self.aux_alpha is not None:
            return self.aux_alpha
        return 0.01 if self.router == "topk_softmax" else 0.0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and any(self.moe_blocks())

    def moe_blocks(self) -> list[bool]:
        """Which blocks carry a MoE layer (the paper's placement ablation)."""
        d = self.depth
        if self.num_experts == 0 or self.moe_placement == "none":
            return [False] * d
        if self.moe_placement == "all":
            return [True] * d
        if self.moe_placement == "every_other":
            return [i % 2 == 1 for i in range(d)]
        if self.moe_placement == "deep_half":
            return [i >= d // 2 for i in range(d)]
        if self.moe_placement == "shallow_half":
            return [i < d // 2 for i in range(d)]
        raise ValueError(f"unknown moe_placement {self.moe_placement!r}; choose one of {MOE_PLACEMENTS}")

    # --------------------------------------------------------------- validation
    def validate(self) -> "ModelConfig":
        """Raise ValueError naming the offending setting; return self for chaining."""
        for key, value in check_field_types(type(self), dataclasses.asdict(self), "invalid model config").items():
            setattr(self, key, value)  # e.g. lr "1e-4" (a string in YAML 1.1) becomes 1e-4
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.input_size % self.patch_size:
            problems.append(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.num_experts < 0:
            problems.append(f"num_experts must be >= 0 (0 = dense), got {self.num_experts}")
        if self.num_experts > 0 and not 1 <= self.top_k <= self.num_experts:
            problems.append(
                f"top_k {self.top_k} must be between 1 and num_experts {self.num_experts}"
            )
        problems += check_choices(self)  # expert_type, dense_mlp_type, attn_layout, moe_placement
        if self.aux_alpha is not None and self.aux_alpha < 0:
            problems.append(f"aux_alpha must be >= 0, got {self.aux_alpha}")
        if not (self.capacity_factor > 0 and math.isfinite(self.capacity_factor)):
            problems.append(f"capacity_factor must be a positive number, got {self.capacity_factor}")
        if self.capacity_warmup_steps < 0:
            problems.append(f"capacity_warmup_steps must be >= 0 (0 = off), got {self.capacity_warmup_steps}")
        if not (self.bias_update_rate >= 0 and math.isfinite(self.bias_update_rate)):
            problems.append(f"bias_update_rate must be >= 0, got {self.bias_update_rate}")
        if not (self.route_scale > 0 and math.isfinite(self.route_scale)):
            problems.append(f"route_scale must be a positive number, got {self.route_scale}")
        if not 0.0 <= self.threshold_decay < 1.0:
            problems.append(f"threshold_decay must be in [0, 1), got {self.threshold_decay}")
        if self.router == "prototype" and self.num_experts > 0:
            if self.num_experts < 2:
                problems.append("router prototype needs num_experts >= 2 (the last expert is the unconditional one)")
            elif not 1 <= self.top_k <= self.num_experts - 1:
                problems.append(f"router prototype: top_k {self.top_k} must be between 1 and num_experts - 1 = "
                                f"{self.num_experts - 1} (the last expert takes only the null class)")
            if self.class_dropout_prob <= 0:
                problems.append("router prototype needs a null class: class_dropout_prob > 0 (its unconditional expert "
                                "learns from the label-dropped images)")
        if not (self.contrastive_weight >= 0 and math.isfinite(self.contrastive_weight)):
            problems.append(f"contrastive_weight must be >= 0, got {self.contrastive_weight}")
        if not (self.similarity_weight >= 0 and math.isfinite(self.similarity_weight)):
            problems.append(f"similarity_weight must be >= 0, got {self.similarity_weight}")
        elif self.similarity_weight > 0 and self.router != "race":
            problems.append(f"similarity_weight is the race router's loss; router {self.router} would ignore it "
                            "(use --model-router race, or leave it at 0)")
        if not (self.contrastive_temperature > 0 and math.isfinite(self.contrastive_temperature)):
            problems.append(f"contrastive_temperature must be a positive number, got {self.contrastive_temperature}")
        if self.router == "topk_softmax" and self.router_score == "sigmoid":
            problems.append("router topk_softmax scores by softmax; for sigmoid scores use --model-router topk_bias "
                            "(or race)")
        if self.shared_hidden is not None and self.shared_hidden < 0:
            problems.append(f"shared_hidden must be >= 0 (0 = no shared expert), got {self.shared_hidden}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            problems.append(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))
        return self

    # ----------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "ModelConfig":
        return cls.from_dict(json.loads(s))

    def comparable(self) -> dict[str, Any]:
        """`to_dict()` with the settings in force: aux_alpha resolved to the router's default, so a
        config saved before the routing fields existed (aux_alpha 0.01, no router) compares equal
        to today's default (aux_alpha None, topk_softmax)."""
        d = self.to_dict()
        d["aux_alpha"] = self.balance_alpha
        return d

    def replace(self, **overrides: Any) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(
                f"unknown model override(s) {sorted(unknown)}; valid overrides: {sorted(known)}"
            )
        return dataclasses.replace(self, **overrides)


__all__ = ["ModelConfig", "TrainConfig", "EXPERT_TYPES", "ATTN_LAYOUTS", "MOE_PLACEMENTS", "ROUTERS", "ROUTER_SCORES",
           "STATEFUL_ROUTERS", "PROCESSES", "PRECISIONS",
           "PARALLEL_MODES", "LOGGERS", "PROCESS_SAMPLERS", "SAMPLER_STEPS", "DEFAULT_CFG_SCALE",
           "check_choices", "load_config_file", "default_sampler", "default_steps", "recorded_sampling", "SAMPLING_FIELDS", "check_field_types", "option"]

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def field_type(hint: Any) -> tuple[type, bool]:
    """(bool, int, float or str; whether None is allowed too) for a config field's annotation."""
    args = [a for a in get_args(hint) if a is not type(None)]
    optional = len(args) < len(get_args(hint))
    base = args[0] if len(args) == 1 else hint
    if base not in _TYPE_WORDS:
        raise TypeError(f"config fields are bool, int, float or str (optionally | None), got {hint}")
    return base, optional


def load_config_file(path: str) -> dict[str, Any]:
    """YAML or TOML with TrainConfig keys and an optional `model_overrides` mapping.

    A file that does not parse, or is not a mapping, raises ValueError naming the file and where
    the parser stopped.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {p} does not exist")
    if not p.is_file():
        raise ValueError(f"config file {p} is a folder; give a YAML or TOML file")
    try:
        text = p.read_text()
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {p} is not a text file ({e.reason} at byte {e.start}); give a YAML or TOML file") from e
    if p.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {p} is not valid TOML: {e}") from e
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = ""
            mark = getattr(e, "problem_mark", None)
            if mark is not None:
                where = f" at line {mark.line + 1}, column {mark.column + 1}"
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"config file {p} is not valid YAML{where}: {problem}. Write one `option: value` "
                             "per line (e.g. `steps: 3000`)") from e
        data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of option: value (e.g. `steps: 3000`), "
                         f"not a {type(data).__name__}")
    return data


def check_field_types(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` with each known field's value checked against the dataclass's annotation.

    Raises ValueError naming the key, the value and the expected type. Lenient only where the
    meaning is unambiguous: an integral float for an int, a numeric string for a float (YAML 1.1
    reads `1e-4` as a string), a number for a string field.
    """
    hints = get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        if key not in hints:
            continue
        base, optional = field_type(hints[key])
        if optional and value is None:
            continue
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars too
        ok = True
        if base is bool:
            ok = isinstance(value, bool)
        elif base is int:
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                out[key] = int(value)
            elif number and math.isfinite(value) and float(value).is_integer():
                out[key] = int(value)
            else:
                ok = False
        elif base is float:
            if isinstance(value, str):
                try:
                    out[key] = float(value)
                except ValueError:
                    ok = False
            else:
                ok = number
        elif base is str:
            if number:
                out[key] = str(value)
            else:
                ok = isinstance(value, str)
        if not ok:
            expected = _TYPE_WORDS[base] + (" or null" if optional else "")
            raise ValueError(f"{where}: {key} = {value!r} ({type(value).__name__}) is not valid; "
                             f"{key} must be {expected}")
    return out


PROCESSES = ("flow", "ddpm")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PARALLEL_MODES = ("none", "ddp", "fsdp", "ep", "ep_fsdp", "zero2", "zero3")
CHECKPOINT_FORMATS = ("auto", "file", "sharded")
LOGGERS = ("csv", "tensorboard", "wandb")  # CSV files are written under every choice
BALANCE_SCOPES = ("local", "global")
VERIFY_MODES = ("fast", "full", "none")
WEIGHT_KINDS = ("ema", "model")
TIME_DISTS = ("logit_normal", "uniform")
LR_DECAYS = ("none", "cosine", "linear")
NOISE_SCHEDULES = ("linear", "cosine")
WANDB_MISSING = ("logger 'wandb' needs the wandb package, which the default install leaves out: pip install wandb "
                 "(WANDB_MODE=offline logs without an account; `wandb sync` uploads later), or train with "
                 "--logger tensorboard")


# Sampling: which samplers fit each process (the first is its default) and each sampler's default
# step count; `ditmoe sample / analyze`, generate() and the training previews read these.
PROCESS_SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("euler", "heun")}
SAMPLER_STEPS = {"ddpm": 250, "ddim": 50, "euler": 50, "heun": 25}
DEFAULT_CFG_SCALE = 1.5  # the paper's guidance scale, where neither a flag nor the run says otherwise


def default_sampler(process: str) -> str:
    """The sampler used for `process` when none is named: ddpm for DDPM models, euler for flows."""
    return PROCESS_SAMPLERS[process][0]


def default_steps(sampler: str) -> int:
    return SAMPLER_STEPS[sampler]


SAMPLING_FIELDS = ("sampler", "sample_steps", "cfg_scale")  # TrainConfig fields recorded for sampling


def recorded_sampling(train: Any) -> dict[str, Any] | None:
    """The sampling settings a run's training config (a dict, as checkpoints and config.json hold
    it) records, resolved ({"sampler", "steps", "cfg_scale"}); None when it records none (runs
    from before they were recorded) or they do not read as valid settings."""
    if not isinstance(train, dict) or not any(k in train for k in SAMPLING_FIELDS):
        return None
    try:
        cfg = TrainConfig(process=train.get("process", "flow"), **{k: train[k] for k in SAMPLING_FIELDS if k in train})
        return cfg.validate().sampling()
    except (TypeError, ValueError):
        return None


def logger_kinds(logger: str) -> list[str]:
    """The loggers named by a TrainConfig.logger value such as "tensorboard,wandb"."""
    return [k.strip() for k in logger.split(",") if k.strip()]


@dataclass
class TrainConfig:
    """Everything `ditmoe train` needs besides the model; CLI flags and config files are made from it."""

    model: str = option("DiT-MoE-mnist", "registry name (see `ditmoe info --list`)")
    data: str = option("mnist", "mnist, digits, an image folder (one subfolder per class) or a latent cache")
    out: str = option("runs/mnist", "output folder: checkpoints, logs, samples")
    process: str = option("flow", "flow (rectified flow) or ddpm (Gaussian diffusion, MSE + VB)", choices=PROCESSES)
    steps: int = option(3000, "optimizer steps (global batches)")
    global_batch: int = option(128, "images per optimizer step, summed over processes and accumulation")
    micro_batch: int = option(0, "images per forward on one process; 0 = global_batch / world size (no accumulation)")
    lr: float = option(1e-4, "AdamW learning rate (constant after the warm-up)")
    warmup_steps: int = option(0, "linear warm-up, then constant (the paper's schedule)")
    lr_decay: str = option("none", "after the warm-up: none (constant, the paper's schedule), or a cosine / "
                           "linear decay to lr_final over the last lr_decay_fraction of the steps", choices=LR_DECAYS)
    lr_decay_fraction: float = option(1.0, "share of the steps (after the warm-up) over which lr_decay runs, "
                                      "at the end of training; in (0, 1]")
    lr_final: float = option(0.0, "learning rate at the last step with lr_decay")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    grad_clip: float = option(0.0, "max global grad norm; 0 disables")
    ema_decay: float = option(0.9999, "decay of the EMA weights (what sampling and evaluation use)")
    ema_warmup: bool = option(True, "decay min(ema_decay, (1 + step) / (10 + step)); false = the fixed decay of DiT")
    precision: str = option("auto", "auto: bf16 on CUDA, and on CPU where it measured faster; fp32; bf16; fp16 "
                            "(with loss scaling)", choices=PRECISIONS)
    grad_checkpointing: bool = option(False, "recompute each block's activations in the backward pass (less memory)")
    compile: bool = option(False, "torch.compile the model")
    parallel: str = option("none", "none, ddp, fsdp, ep, ep_fsdp, or DeepSpeed zero2 / zero3 (docs/scaling.md)",
                           choices=PARALLEL_MODES)
    ep_size: int = option(0, "expert-parallel group size for ep / ep_fsdp (divides world and num_experts); 0 = world")
    balance_scope: str = option("local", "balance loss over each process's tokens (local, as the official code) or "
                                "all processes' (global)", choices=BALANCE_SCOPES)
    deepspeed_offload: bool = option(False, "zero2 / zero3: optimizer state (and zero3 parameters) in host memory")
    deepspeed_config: str = option("", "zero2 / zero3: a DeepSpeed JSON merged over the generated config")
    seed: int = option(0, "seed of the weights, the data order, the noise and the label dropout")
    num_workers: int = option(0, "data-loader worker processes (image folders benefit; in-memory MNIST does not)")
    flip: bool = option(True, "random horizontal flips (image folders and latent caches; never for digits)")
    allow_upscale: bool = option(False, "image folders: upscale (bicubic) images smaller than the model input "
                                 "instead of refusing the folder")
    grayscale: bool = option(False, "image folders: read the images as one channel (L) instead of RGB")
    verify_images: str = option("fast", "image folders: check every file before training: fast (headers and "
                                "structure), full (decode each image once; also finds truncated JPEGs) or none; "
                                "unreadable files are left out and reported", choices=VERIFY_MODES)
    log_every: int = option(50, "steps between log lines / CSV rows; 0 = one row, at the end")
    ckpt_every: int = option(1000, "steps between checkpoints; 0 = only the one always written at the end")
    keep_last: int = option(2, "checkpoints kept on disk")
    checkpoint_format: str = option("auto", "file: one file per checkpoint (step_N.pt; under fsdp / ep the state is "
                                    "gathered on rank 0); sharded: a folder (step_N.dcp) of every rank's shards, "
                                    "written by torch.distributed.checkpoint, nothing gathered; auto: sharded under "
                                    "fsdp / ep / ep_fsdp on several processes when the state exceeds "
                                    "sharded_above_gb, else file", choices=CHECKPOINT_FORMATS)
    sharded_above_gb: float = option(16.0, "checkpoint_format auto: the size of weights + EMA + AdamW state (16 bytes "
                                     "per parameter; 16 GB = 1B parameters) above which checkpoints are sharded")
    resume: str = option("", "'' (fresh; refused if out holds a run), auto (the newest checkpoint in "
                         "out/checkpoints; where there is none, a new run starts and says so) or a checkpoint path")
    init_from: str = option("", "start a new run (step 0, fresh optimizer, EMA = these weights) from a training "
                            "checkpoint, a model file (model_ema.safetensors, ditmoe upcycle / convert output) or an "
                            "official DiT-MoE / DiT checkpoint; its shapes must be the run's model's, apart from the "
                            "class count and the input size")
    init_weights: str = option("ema", "with init_from a training checkpoint: its ema weights or the raw model ones",
                               choices=WEIGHT_KINDS)
    overwrite: bool = option(False, "start afresh in an out folder that holds a run, deleting that run's "
                             "checkpoints, logs and weights (other files stay)")
    logger: str = option("tensorboard", "metrics.csv and expert_load.csv always; tensorboard adds OUT/tensorboard, "
                         "wandb Weights & Biases (pip install wandb; WANDB_MODE=offline works without an account), "
                         "tensorboard,wandb both, csv nothing more", choices=LOGGERS, many=True)
    sample_every: int = option(0, "steps between preview grids from the EMA weights (OUT/previews/step_XXXXXXX.png "
                               "and the logger; also at the last step); 0 = off")
    # The sampling this recipe was tuned for: recorded with the run (checkpoints, config.json,
    # model_ema.safetensors); previews use it, and `ditmoe sample` / `analyze` when no flag says otherwise.
    sampler: str = option("", "sampler recorded with the run; '' = the process's default (euler for flow, "
                          "ddpm for DDPM)", choices=("",) + tuple(SAMPLER_STEPS))
    sample_steps: int = option(0, "sampling steps recorded with the run; 0 = the sampler's default")
    cfg_scale: float = option(DEFAULT_CFG_SCALE, "classifier-free guidance scale recorded with the run (1 = none)")
    # rectified flow
    time_dist: str = option("logit_normal", "flow: distribution of the training times", choices=TIME_DISTS)
    time_mean: float = option(0.0, "flow: mean of the logit-normal times")
    time_std: float = option(1.0, "flow: std of the logit-normal times")
    # DDPM
    noise_schedule: str = option("linear", "ddpm: beta schedule", choices=NOISE_SCHEDULES)
    diffusion_steps: int = option(1000, "ddpm: diffusion steps of the training process")
    progress: bool = option(True, "progress bar on the terminal")

    def sampling(self) -> dict[str, Any]:
        """The recorded sampling settings, resolved: {"sampler", "steps", "cfg_scale"}."""
        sampler = self.sampler or default_sampler(self.process)
        return {"sampler": sampler, "steps": self.sample_steps or default_steps(sampler), "cfg_scale": self.cfg_scale}

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming every bad setting and its allowed range; return self for chaining."""
        for key, value in check_field_types(type(self), dataclasses.asdict(self), "invalid training config").items():
            setattr(self, key, value)  # e.g. lr "1e-4" (a string in YAML 1.1) becomes 1e-4
        problems = []
        problems += check_choices(self)  # process, precision, parallel, logger, ... (their `choices`)
        if (self.deepspeed_offload or self.deepspeed_config) and self.parallel not in ("zero2", "zero3"):
            problems.append("deepspeed_offload / deepspeed_config need --parallel zero2 or zero3")
        if self.compile and self.parallel in ("zero2", "zero3"):
            problems.append("compile is not supported with the DeepSpeed layouts; drop --compile or use fsdp")
        if self.ep_size < 0:
            problems.append(f"ep_size must be >= 0 (0 = the whole world), got {self.ep_size}")
        if self.checkpoint_format == "sharded" and self.parallel in ("zero2", "zero3"):
            problems.append("checkpoint_format sharded is not supported with the DeepSpeed layouts (zero2 / zero3); "
                            "use file (or auto), or --parallel fsdp / ep_fsdp")
        if not (math.isfinite(self.sharded_above_gb) and self.sharded_above_gb >= 0):
            problems.append(f"sharded_above_gb must be a finite number >= 0, got {self.sharded_above_gb}")
        if not self.out.strip():
            problems.append("out must name an output folder, got an empty string")
        if not self.data.strip():
            problems.append("data must name a dataset (mnist, digits), an image folder or a latent cache")
        for name, low in (("steps", 1), ("global_batch", 1), ("micro_batch", 0), ("warmup_steps", 0),
                          ("num_workers", 0), ("log_every", 0), ("ckpt_every", 0), ("keep_last", 1), ("sample_every", 0),
                          ("diffusion_steps", 1)):
            if getattr(self, name) < low:
                problems.append(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not 0 < self.lr_decay_fraction <= 1:
            problems.append(f"lr_decay_fraction must be in (0, 1], got {self.lr_decay_fraction}")
        if not 0 <= self.lr_final <= self.lr:
            problems.append(f"lr_final must be in [0, lr = {self.lr}], got {self.lr_final}")
        if self.sampler and self.process in PROCESS_SAMPLERS and self.sampler not in PROCESS_SAMPLERS[self.process]:
            problems.append(f"sampler {self.sampler} does not sample a {self.process} model; choose one of "
                            f"{', '.join(PROCESS_SAMPLERS[self.process])}, or '' for the default")
        if self.sample_steps < 0:
            problems.append(f"sample_steps must be >= 0 (0 = the sampler's default), got {self.sample_steps}")
        if self.cfg_scale < 0:
            problems.append(f"cfg_scale must be >= 0 (1 = no guidance), got {self.cfg_scale}")
        if self.steps > 10**9:
            problems.append(f"steps {self.steps} is more than 10^9 optimizer steps; check the value")
        if self.global_batch > 2**24:
            problems.append(f"global_batch {self.global_batch} is more than 2^24 images per step; check the value")
        if self.micro_batch > self.global_batch:
            problems.append(f"micro_batch {self.micro_batch} is larger than global_batch {self.global_batch}")
        if not 0 <= self.seed < 2**32:
            problems.append(f"seed must be in [0, 2^32), got {self.seed}")
        for name in ("lr", "weight_decay", "grad_clip", "ema_decay", "adam_beta1", "adam_beta2", "time_mean", "time_std"):
            if not math.isfinite(getattr(self, name)):
                problems.append(f"{name} must be a finite number, got {getattr(self, name)}")
        if math.isfinite(self.lr) and not 0 < self.lr <= 1:
            problems.append(f"lr must be in (0, 1] (AdamW; DiT uses 1e-4), got {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            problems.append(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.time_std <= 0:
            problems.append(f"time_std must be positive, got {self.time_std}")
        if "wandb" in logger_kinds(self.logger):
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                problems.append(WANDB_MISSING)
        if self.init_from and self.resume:
            problems.append(f"init_from and resume contradict each other: --resume continues a run from its checkpoint "
                            f"(step, optimizer and all), --init-from starts a new run from weights; give one of them "
                            f"(to continue a run that was started with --init-from, give --resume alone, with --init-from '')")
        if self.overwrite and self.resume == "auto":
            problems.append("overwrite and resume 'auto' contradict each other: --resume auto continues the run "
                            "in --out, --overwrite true deletes it; give one of them")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
