"""Checkpoint formats: one loader for every checkpoint ditmoe reads, official DiT-MoE / DiT
checkpoints <-> this package, the package's own model files, dense -> MoE upcycling.

The official code stores each expert as its own `nn.Linear` trio
(`blocks.i.moe.experts.e.{gate,up,down}_proj.weight`, Linear layout (out, in)); this package
stacks them per layer in `x @ W` layout (`experts.w_in` = [gate | up], `experts.w_out`). Every
other key is shared verbatim, so conversion is a pure re-arrangement and round-trips exactly.

Loading is safe by construction: safetensors, or `torch.load(weights_only=True)`. The file and
state-dict helpers this builds on are in `weights_io`; model folders are in `pretrained`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import ModelConfig, recorded_sampling
from .registry import create_model
# The file and state-dict helpers live in weights_io (which pretrained and export import too);
# they stay importable from here, where the README and older code import them.
from .weights_io import (_PASS_INSTEAD, CheckpointMismatchError, StateDict, atomic_write, check_output_dir,  # noqa: F401
                         check_output_file, disk_write_error, infer_config, load_into, matching_model_names,
                         official_to_package, package_to_official, read_safetensors, torch_load_weights_only)


# ---------------------------------------------------------------------------- reading files
def check_checkpoint_path(path: str | os.PathLike, flag: str = "checkpoint") -> Path:
    """The path of an existing checkpoint file or model folder (`ditmoe.save_pretrained`'s, or a
    diffusers DiTTransformer2DModel's); any other folder gets a list of the checkpoints found in it."""
    path = Path(path)
    if path.is_dir():
        from .pretrained import is_diffusers_folder, is_pretrained_folder

        if is_pretrained_folder(path) or is_diffusers_folder(path):
            return path
        if _is_sharded_folder(path):  # read (and checked) by load_model_and_info
            return path
        found = [p for p in (path / "model_ema.safetensors",) if p.is_file()]
        found += sorted((path / "checkpoints").glob("step_*.pt")) if (path / "checkpoints").is_dir() else []
        found += sorted((path / "checkpoints").glob("step_*.dcp")) if (path / "checkpoints").is_dir() else []
        found += sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".pt", ".pth", ".bin")
                        and p not in found)
        hint = ("it holds: " + ", ".join(str(p) for p in found[:8]) + (" ..." if len(found) > 8 else "")
                if found else "it holds no checkpoint (.safetensors / .pt)")
        raise ValueError(f"{flag} {path} is a folder, not a checkpoint file or model folder (one with the "
                         "config.json of ditmoe.save_pretrained or of a diffusers DiTTransformer2DModel); pass a file such as "
                         f"{path / 'model_ema.safetensors'} (a run's EMA weights) or {path / 'checkpoints' / 'step_N.pt'} "
                         f"(a training checkpoint); {hint}")
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist")
    return path


def read_state_dict(src: str | os.PathLike | Mapping[str, Any]) -> tuple[StateDict, dict[str, str]]:
    """Read a checkpoint into a flat state dict plus its metadata (safetensors) without unpickling code.

    Accepts .safetensors, or .pt/.pth/.bin (torch.load with weights_only=True) holding either a
    bare state dict or one wrapped under "ema" (preferred, the weights results are reported with),
    "model", "state_dict" or "module"; a "module." prefix (DDP) is removed.
    """
    meta: dict[str, str] = {}
    if isinstance(src, Mapping):
        sd = dict(src)
    else:
        path = check_checkpoint_path(src)
        if path.suffix == ".safetensors":
            sd, meta = read_safetensors(path)
        else:
            sd = torch_load_weights_only(path)
            if not isinstance(sd, Mapping):
                raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict; {_PASS_INSTEAD}")
    for wrapper in ("ema", "model", "state_dict", "module"):
        if wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = dict(sd[wrapper])
            break
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint entries {bad[:5]} are not tensors; expected a flat state dict")
    return sd, meta


# --------------------------------------------------------------------------- loading
def load_official(src: str | os.PathLike | Mapping[str, Any], config: ModelConfig | str | None = None,
                  **overrides: Any):
    """Build the model an official DiT-MoE / DiT checkpoint describes and load it (eval mode).

    `config` may be a registry name or ModelConfig; otherwise it is inferred from the weights
    (plus the safetensors "config" metadata when present). Overrides apply on top, e.g.
    `timestep_scale` or `top_k`.
    """
    sd, meta = read_state_dict(src)
    meta_cfg = json.loads(meta["config"]) if "config" in meta else {}
    sd = official_to_package(sd)
    if config is None:
        cfg = infer_config(sd, meta_cfg)
    elif isinstance(config, str):
        from .registry import get_config

        cfg = get_config(config)
    else:
        cfg = config
    cfg = cfg.replace(**overrides).validate() if overrides else cfg
    model = create_model(cfg)
    load_into(model, sd)
    return model.eval()


def export_official(model_or_sd) -> StateDict:
    """State dict in the official key layout (per-expert Linear weights). The official code routes
    by top-k softmax only: models of another router (`ModelConfig.router`) are refused."""
    cfg = getattr(model_or_sd, "config", None)
    if cfg is not None and cfg.is_moe and cfg.router != "topk_softmax":
        raise ValueError(f"the official DiT-MoE layout has only the top-k softmax router; this model routes with "
                         f"{cfg.router!r}: keep it in this package's format (--to package or folder)")
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else model_or_sd
    return package_to_official(sd)


# ---------------------------------------------------------------- package's own format
def save_model(model_or_sd, path: str | os.PathLike, config: ModelConfig | None = None,
               extra_meta: dict[str, str] | None = None) -> Path:
    """Save weights as safetensors with the JSON config in its metadata and beside it (.json)."""
    from safetensors.torch import save_file

    if isinstance(model_or_sd, torch.nn.Module):
        sd, config = model_or_sd.state_dict(), config or model_or_sd.config
    else:
        sd = model_or_sd
    if config is None:
        raise ValueError("save_model needs a config when given a bare state dict")
    path = Path(path)
    meta = {"format": "ditmoe", "config": config.to_json(), **(extra_meta or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(config.to_dict(), indent=2)))
    return path


def run_train_config_near(path: str | os.PathLike) -> dict[str, Any] | None:
    """The training config (a dict) in the config.json of the run a checkpoint sits in, if any."""
    path = Path(path)
    for candidate in (path.parent / "config.json", path.parent.parent / "config.json"):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                continue
            if isinstance(data, dict) and isinstance(data.get("train"), dict):
                return data["train"]
    return None


def run_process_near(path: str | os.PathLike) -> str | None:
    """The process ("flow" / "ddpm") in the config.json of the run a checkpoint sits in, if any."""
    train = run_train_config_near(path)
    return train.get("process") if train else None


def load_model_and_info(path: str | os.PathLike, weights: str = "ema", config: ModelConfig | str | None = None,
                        **overrides: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load any checkpoint ditmoe reads (eval mode) and say what it is.

    A training checkpoint (format "ditmoe-train") is built from the model config it records and
    loaded with its `weights` ("ema" or "model"); `config` and overrides that contradict the
    recorded config are refused, since the weights were trained with it. A model saved by
    `save_model` carries its config; anything else is read as an official checkpoint (`config`
    names its architecture, or it is inferred from the shapes).

    The info dict has "weights" ("ema" / "model" for training checkpoints, the file's own label
    such as "ema" for a run's model_ema.safetensors, else "file") and, when the checkpoint records
    them, "process" ("flow" / "ddpm") and "sampling" (the run's recorded {"sampler", "steps",
    "cfg_scale"}).
    """
    path = check_checkpoint_path(path)
    if path.is_dir() and _is_sharded_folder(path):
        return _from_sharded_checkpoint(path, weights, config, overrides)
    if path.is_dir():  # a model folder carries its config: a model name or overrides could only contradict it
        from .pretrained import load_pretrained_and_info

        if config is not None or overrides:
            given = ([f"model {getattr(config, 'name', config)}"] if config is not None else []) + [f"{k}={v!r}" for k, v in overrides.items()]
            raise ValueError(f"{path} is a model folder whose config.json records its model; drop "
                             f"{', '.join(given)}, which could only contradict it")
        return load_pretrained_and_info(path)
    if path.suffix == ".safetensors":
        sd, meta = read_safetensors(path)
    else:
        raw = torch_load_weights_only(path)
        if isinstance(raw, Mapping) and raw.get("format") == "ditmoe-train":
            return _from_training_checkpoint(raw, path, weights, config, overrides)
        if not isinstance(raw, Mapping):
            raise ValueError(f"{path} holds a {type(raw).__name__}, not a state dict; {_PASS_INSTEAD}")
        sd, meta = read_state_dict(raw)
    try:
        return _from_state_dict(path, sd, meta, config, overrides)
    except ValueError as e:  # which file does not fit, for the CLI's one-line error
        kind = CheckpointMismatchError if isinstance(e, CheckpointMismatchError) else ValueError
        raise kind(f"{path}: {e}") from e


def _from_state_dict(path: Path, sd: StateDict, meta: dict[str, str], config, overrides: dict[str, Any]):
    info = {"weights": meta.get("weights", "file")}
    if meta.get("process") in ("flow", "ddpm"):
        info["process"] = meta["process"]
    if "sampling" in meta:
        try:
            sampling = json.loads(meta["sampling"])
        except json.JSONDecodeError:
            sampling = None
        if isinstance(sampling, dict) and set(sampling) == {"sampler", "steps", "cfg_scale"}:
            info["sampling"] = sampling
    if config is not None:
        return load_official(sd, config=config, **overrides), info
    if meta.get("format") == "ditmoe":
        cfg = ModelConfig.from_json(meta["config"])
    elif path.with_suffix(".json").exists() and path.suffix == ".safetensors":
        cfg = ModelConfig.from_dict(json.loads(path.with_suffix(".json").read_text()))
    else:
        # The official constructor arguments (plus the time convention and process that
        # `ditmoe convert --to official` adds) fill in what the shapes cannot tell.
        meta_cfg = json.loads(meta["config"]) if "config" in meta else {}
        if meta_cfg.get("process") in ("flow", "ddpm"):
            info.setdefault("process", meta_cfg["process"])
        cfg = infer_config(official_to_package(sd), meta_cfg)
        return load_official(sd, config=cfg, **overrides), info
    if overrides:
        cfg = cfg.replace(**overrides)
    model = create_model(cfg.validate())
    load_into(model, official_to_package(sd))
    return model.eval(), info


def _from_training_checkpoint(state: Mapping[str, Any], path: Path, weights: str, config, overrides: dict[str, Any]):
    cfg = ModelConfig.from_json(state["model_config"])
    if config is not None:
        raise ValueError(f"{path} is a training checkpoint: it records its model config ({cfg.name}, depth {cfg.depth}, "
                         f"hidden {cfg.hidden_size}); drop the model name, which could only contradict it")
    clash = {k: v for k, v in overrides.items() if getattr(cfg, k) != v}
    if clash:
        raise ValueError(f"{path} is a training checkpoint trained with " + ", ".join(
            f"{k}={getattr(cfg, k)!r}" for k in clash) + "; the override " + ", ".join(
            f"{k}={v!r}" for k, v in clash.items()) + " would load its weights into another model: drop it")
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    model = create_model(cfg)
    load_into(model, state[weights])
    info: dict[str, Any] = {"weights": weights}
    try:
        train = json.loads(state["train_config"])
    except (KeyError, TypeError, json.JSONDecodeError):
        train = None
    process = train.get("process") if isinstance(train, dict) else None
    if process in ("flow", "ddpm"):
        info["process"] = process
    sampling = recorded_sampling(train)
    if sampling:
        info["sampling"] = sampling
    return model.eval(), info


def _is_sharded_folder(path: Path) -> bool:
    from .parallel.dcp_files import SUFFIX, is_sharded_checkpoint

    return is_sharded_checkpoint(path) or path.suffix == SUFFIX


def _from_sharded_checkpoint(path: Path, weights: str, config, overrides: dict[str, Any]):
    """A sharded training checkpoint (RUN/checkpoints/step_N.dcp): its `weights` ("ema" / "model")
    assembled whole in this process from every rank's shards, nothing else read."""
    from .parallel.dcp_files import read_full, read_side_file

    side = read_side_file(path)
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    return _from_training_checkpoint({**side, weights: read_full(path, weights)}, path, weights, config, overrides)


def load_model(path: str | os.PathLike, **overrides: Any):
    """Load a model saved by `save_model`, an official checkpoint, or a training checkpoint (its EMA weights)."""
    return load_model_and_info(path, **overrides)[0]


# ------------------------------------------------------------------------ upcycling
def upcycle(dense_src, num_experts: int = 8, top_k: int = 2, norm_topk: bool = True, shared_hidden: int = 0,
            router_std: float = 0.02, noise_std: float = 0.0, aux_alpha: float = 0.01, seed: int = 0):
    """Turn a dense DiT (official GELU checkpoint, or this package's dense model) into a DiT-MoE.

    Every expert starts as a copy of the block's dense MLP, the router is drawn from
    N(0, router_std), and optional Gaussian noise (relative std `noise_std`) breaks expert symmetry.
    With `norm_topk=True` and no shared expert the result computes exactly the dense function.
    """
    if not isinstance(dense_src, (torch.nn.Module, Mapping)):
        # A file: read like any checkpoint, so a training checkpoint keeps its recorded config.
        dense_src = load_model_and_info(dense_src)[0]
    if isinstance(dense_src, torch.nn.Module):
        sd, cfg = dense_src.state_dict(), dense_src.config
    else:
        sd, meta = read_state_dict(dense_src)
        cfg = ModelConfig.from_json(meta["config"]) if meta.get("format") == "ditmoe" else infer_config(
            sd, json.loads(meta["config"]) if "config" in meta else None)
    if cfg.num_experts != 0:
        raise ValueError(f"upcycle expects a dense model, but this checkpoint already has {cfg.num_experts} experts")
    kind, hidden = cfg.dense_mlp_type, cfg.dense_hidden
    moe_cfg = cfg.replace(name=f"{cfg.name}-upcycled-{num_experts}E{top_k}A", num_experts=num_experts, top_k=top_k,
                          norm_topk=norm_topk, shared_hidden=shared_hidden, expert_type=kind, expert_hidden=hidden,
                          aux_alpha=aux_alpha, moe_placement="all").validate()
    model = create_model(moe_cfg)
    gen = torch.Generator().manual_seed(seed)
    new_sd = model.state_dict()
    for k, v in sd.items():
        if not re.match(r"blocks\.\d+\.mlp\.", k) and k in new_sd:
            new_sd[k] = v.clone()
    for i in range(cfg.depth):
        p, q = f"blocks.{i}.mlp.", f"blocks.{i}.moe."
        if kind == "gelu":
            w_in, b_in = sd[p + "fc1.weight"].t(), sd[p + "fc1.bias"]
            w_out, b_out = sd[p + "fc2.weight"].t(), sd[p + "fc2.bias"]
            new_sd[q + "experts.b_in"] = b_in.expand(num_experts, -1).clone()
            new_sd[q + "experts.b_out"] = b_out.expand(num_experts, -1).clone()
        else:
            w_in = torch.cat([sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"]], 0).t()
            w_out = sd[p + "down_proj.weight"].t()
        stacked_in = w_in.expand(num_experts, -1, -1).clone()
        stacked_out = w_out.expand(num_experts, -1, -1).clone()
        if noise_std > 0:
            stacked_in += noise_std * stacked_in.std() * torch.randn(stacked_in.shape, generator=gen)
            stacked_out += noise_std * stacked_out.std() * torch.randn(stacked_out.shape, generator=gen)
        new_sd[q + "experts.w_in"] = stacked_in
        new_sd[q + "experts.w_out"] = stacked_out
        new_sd[q + "gate.weight"] = router_std * torch.randn(new_sd[q + "gate.weight"].shape, generator=gen)
        if shared_hidden > 0:
            # A zero output projection makes the new shared expert start as a no-op, so the
            # upcycled model still computes the dense function on step 0.
            new_sd[q + "shared_experts.down_proj.weight"].zero_()
    model.load_state_dict(new_sd, strict=True)
    return model.eval()
