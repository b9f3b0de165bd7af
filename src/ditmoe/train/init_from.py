"""Start a new training run from existing weights: `ditmoe train --init-from PATH`.

An init-from run is a fresh run (step 0, a new optimizer, the EMA a copy of the loaded weights)
whose model starts from weights instead of a random draw. Accepted files: this package's training
checkpoints (their EMA weights, or the raw ones with --init-weights model), models written by
`ditmoe.convert.save_model` (a run's model_ema.safetensors, `ditmoe upcycle` / `ditmoe convert`
output), and official DiT-MoE / DiT state dicts (.pt or .safetensors).

The run's model config still comes from --model, the overrides and the data. The weights must
have its shapes, with two exceptions that a new dataset brings:
- another class count: the label embedding (`y_embedder`) keeps its fresh initialisation;
- another input size: `pos_embed` is DiT's fixed 2-D sin-cos table (a frozen parameter computed
  from the patch grid, not learned), so the run's own table for its grid is kept.
Any other difference is refused before training, naming the keys and shapes and, where the
weights say which model they are, the --model or --model-* overrides that fit them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config import ModelConfig

INIT_WEIGHTS = ("ema", "model")
# Keys whose shape may differ from the weights' (see the module docstring).
LABEL_KEY = "y_embedder.embedding_table.weight"
POS_KEY = "pos_embed"


@dataclass
class InitSource:
    """Weights read from an --init-from file, in this package's key layout."""

    path: Path
    state: dict[str, torch.Tensor]
    kind: str  # what the file is, for the log
    config: ModelConfig | None  # recorded in the file, or inferred from its shapes; None if neither works
    config_recorded: bool  # True: the file records its config (non-shape settings are then known)
    process: str | None = None  # "flow" / "ddpm" where the file records it


@dataclass
class InitReport:
    """What `init_model` did: `reinitialised` keys kept the run's own values; `lines` were logged."""

    path: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- reading
def check_init_from(init_from: str, weights: str, out: Path | None = None, overwrite: bool = False) -> Path:
    """The --init-from file, checked before any work: it exists, and --overwrite would not delete it."""
    from ..convert import check_checkpoint_path
    from .rundir import run_files

    path = check_checkpoint_path(init_from, "--init-from")
    if weights not in INIT_WEIGHTS:
        raise ValueError(f"--init-weights must be one of {INIT_WEIGHTS}, got {weights!r}")
    if overwrite and out is not None:
        resolved, out_resolved = path.resolve(), out.resolve()
        doomed = {(out_resolved / f).resolve() for f in run_files(out)}
        if resolved in doomed:
            raise ValueError(f"--init-from {path} is a file of the run in --out {out}, which --overwrite true deletes "
                             "before training; copy the weights out of that folder first, or give another --out")
    return path


def read_init_source(init_from: str, weights: str = "ema", out: Path | None = None,
                     overwrite: bool = False) -> InitSource:
    """Read the weights of an --init-from file (any checkpoint `ditmoe.convert.load_model` reads)."""
    from ..convert import read_state_dict
    from ..weights_io import (_PASS_INSTEAD, infer_config, official_to_package, read_safetensors,
                              torch_load_weights_only)

    from .checkpoint import is_sharded

    path = check_init_from(init_from, weights, out, overwrite)
    config: ModelConfig | None = None
    recorded, process = False, None
    if path.is_dir() and is_sharded(path):  # RUN/checkpoints/step_N.dcp: the asked-for weights, assembled here
        from ..parallel.dcp_files import read_full, read_side_file

        side = read_side_file(path)
        config, recorded = ModelConfig.from_json(side["model_config"]), True
        sd = read_full(path, weights)
        kind = f"a ditmoe sharded training checkpoint (step {side.get('step', '?')}, {weights} weights)"
        process = json.loads(side["train_config"]).get("process")
    elif path.suffix == ".safetensors":
        sd, meta = read_safetensors(path)
        if meta.get("process") in ("flow", "ddpm"):
            process = meta["process"]
        if meta.get("format") == "ditmoe":
            config, recorded = ModelConfig.from_json(meta["config"]), True
            kind = f"a ditmoe model file ({meta.get('weights', 'weights')})" if meta.get("weights") else "a ditmoe model file"
        elif path.with_suffix(".json").is_file():
            config, recorded = ModelConfig.from_dict(json.loads(path.with_suffix(".json").read_text())), True
            kind = "a safetensors model with its config beside it"
        else:
            kind = "an official DiT-MoE / DiT checkpoint (safetensors)"
            meta_cfg = json.loads(meta["config"]) if "config" in meta else {}
            if meta_cfg.get("process") in ("flow", "ddpm"):
                process = meta_cfg["process"]
            config = _try_infer(infer_config, official_to_package(sd), meta_cfg)
        if weights != "ema":
            raise ValueError(f"--init-weights {weights} picks the raw weights of a training checkpoint (.pt); "
                             f"{path} holds one set of weights: leave --init-weights out")
    else:
        raw = torch_load_weights_only(path)
        if not isinstance(raw, Mapping):
            raise ValueError(f"--init-from {path} holds a {type(raw).__name__}, not a state dict; {_PASS_INSTEAD}")
        if raw.get("format") == "ditmoe-train":
            config, recorded = ModelConfig.from_json(raw["model_config"]), True
            sd = dict(raw[weights])
            kind = f"a ditmoe training checkpoint (step {raw.get('step', '?')}, {weights} weights)"
            try:
                process = json.loads(raw["train_config"]).get("process")
            except (KeyError, TypeError, json.JSONDecodeError):
                process = None
        else:
            if isinstance(raw.get("ema"), Mapping) and isinstance(raw.get("model"), Mapping):
                raw = {weights: raw[weights]}  # an official training checkpoint: pick the asked-for set
            elif weights != "ema":
                raise ValueError(f"--init-weights {weights} picks the raw weights of a training checkpoint; {path} "
                                 "holds one set of weights: leave --init-weights out")
            sd, _ = read_state_dict(raw)
            kind = "an official DiT-MoE / DiT checkpoint (.pt)"
            config = _try_infer(infer_config, official_to_package(sd), {})
    sd = official_to_package(sd)  # this package's layout is left as it is
    if process not in ("flow", "ddpm"):
        process = None
    return InitSource(path, sd, kind, config, recorded, process)


def _try_infer(infer, sd, meta_cfg) -> ModelConfig | None:
    try:
        return infer(sd, meta_cfg)
    except ValueError as e:
        if "not a DiT / DiT-MoE model" in str(e):
            raise ValueError(f"--init-from: {e}") from e
        return None  # shapes only a partial model has: the key comparison below reports it


# --------------------------------------------------------------------------- loading
def init_model(model: torch.nn.Module, source: InitSource, run_cfg: ModelConfig, process: str,
               log: bool = True) -> InitReport:
    """Copy `source`'s weights into `model` (built from `run_cfg`), keeping the run's fresh label
    embedding where the class count differs and its own position table where the grid differs.

    Raises ValueError naming every other mismatching key before anything is copied.
    """
    target = model.state_dict()
    sd = source.state
    report = InitReport(str(source.path), source.kind)
    # Router state (topk_bias's bias, race / token_pool thresholds) is not a weight: a run with
    # another router starts it fresh, and the weights' own router state is left out.
    fresh_state = [k for k in target if k not in sd and _is_router_state(k)]
    dropped_state = [k for k in sd if k not in target and _is_router_state(k)]
    keep_fresh = set(fresh_state)
    missing = [k for k in target if k not in sd and k not in keep_fresh]
    unexpected = [k for k in sd if k not in target and k not in set(dropped_state)]
    bad: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    keep: dict[str, str] = {}
    for k, want in target.items():
        if k not in sd or sd[k].shape == want.shape:
            continue
        got = sd[k].shape
        if k == LABEL_KEY and got[1:] == want.shape[1:]:
            keep[k] = (f"y_embedder re-initialised: the weights embed {got[0] - 1} classes, this run's data has "
                       f"{want.shape[0] - 1}; the label embedding starts from a fresh N(0, 0.02) draw")
        elif k == POS_KEY and got[0] == want.shape[0] and got[2:] == want.shape[2:]:
            keep[k] = (f"pos_embed recomputed for this run's {_grid(want.shape[1])} patch grid (the weights have "
                       f"{_grid(got[1])}): it is DiT's fixed sin-cos table, made from the grid, not learned")
        else:
            bad.append((k, tuple(got), tuple(want.shape)))
    if missing or unexpected or bad:
        raise ValueError(_mismatch_message(source, run_cfg, missing, unexpected, bad))
    merged = {k: (target[k] if k in keep or k in keep_fresh else sd[k]) for k in target}
    model.load_state_dict(merged, strict=True)
    report.loaded = [k for k in target if k not in keep and k not in keep_fresh]
    report.reinitialised = sorted(set(keep) | keep_fresh)
    report.lines.append(f"--init-from {source.path}: {source.kind}; {len(report.loaded)} of {len(target)} tensors "
                        "loaded; a new run starts at step 0 with a fresh optimizer and its EMA equal to these weights")
    report.lines.extend(keep[k] for k in sorted(keep))
    src_router = source.config.router if source.config is not None else "?"
    if fresh_state:
        report.lines.append(f"router {run_cfg.router}: its state ({len(fresh_state)} buffers, e.g. {fresh_state[0]}) "
                            f"starts fresh; the weights were trained with router {src_router}")
    if dropped_state:
        report.lines.append(f"the weights' router state ({len(dropped_state)} buffers, e.g. {dropped_state[0]}) of router "
                            f"{src_router} is left out: this run routes with {run_cfg.router}")
    report.lines.extend(_setting_notes(source, run_cfg, process))
    if log:
        for line in report.lines:
            print(line)
    return report


def _grid(tokens: int) -> str:
    side = int(round(tokens ** 0.5))
    return f"{side}x{side}" if side * side == tokens else f"{tokens}-token"


def _setting_notes(source: InitSource, run_cfg: ModelConfig, process: str) -> list[str]:
    """Settings the shapes do not show (recorded in the file) that this run changes: said, not refused."""
    notes = []
    if source.process and source.process != process:
        notes.append(f"note: the weights were trained with --process {source.process}; this run trains {process}")
    src = source.config
    if src is None or not source.config_recorded:
        return notes
    for name in ("top_k", "norm_topk", "num_heads", "timestep_scale"):
        if name in ("top_k", "norm_topk") and not (src.is_moe and run_cfg.is_moe):
            continue
        a, b = getattr(src, name), getattr(run_cfg, name)
        if a != b:
            notes.append(f"note: the weights were made with {name}={a!r}; this run uses {b!r} "
                         f"(--model-{name.replace('_', '-')} {_flag_value(a)} keeps the weights' setting)")
    return notes


# ------------------------------------------------------------------------- diagnosis
def _signature(cfg: ModelConfig) -> dict[str, Any]:
    """The settings that decide the state dict's shapes, apart from class count and input size."""
    sig: dict[str, Any] = {
        "hidden_size": cfg.hidden_size, "depth": cfg.depth, "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels, "learn_sigma": cfg.learn_sigma, "attn_layout": cfg.attn_layout,
    }
    if cfg.attn_layout == "fused_qknorm":
        sig["num_heads"] = cfg.num_heads  # q/k LayerNorms are head_dim wide
    if cfg.is_moe:
        sig.update(num_experts=cfg.num_experts, moe_placement=tuple(cfg.moe_blocks()), expert_type=cfg.expert_type,
                   expert_hidden=cfg.routed_hidden, shared_hidden=cfg.shared_width)
    else:
        sig.update(num_experts=0)
    if not all(cfg.moe_blocks()):
        sig.update(dense_mlp_type=cfg.dense_mlp_type, mlp_ratio=cfg.dense_hidden / cfg.hidden_size)
    return sig


def _flag_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def suggest_overrides(src: ModelConfig, run_cfg: ModelConfig) -> dict[str, Any] | None:
    """--model-* overrides that give `run_cfg` the shapes of `src`, or None where none can (input channels)."""
    want, have = _signature(src), _signature(run_cfg)
    if want.get("in_channels") != have.get("in_channels"):
        return None
    out: dict[str, Any] = {}
    for name in ("hidden_size", "depth", "patch_size", "attn_layout", "learn_sigma", "num_experts",
                 "expert_type", "expert_hidden", "shared_hidden"):
        if name in want and want.get(name) != have.get(name):
            out[name] = want[name]
    if "dense_mlp_type" in want:  # the run may have no dense block yet: compare the settings themselves
        if src.dense_mlp_type != run_cfg.dense_mlp_type:
            out["dense_mlp_type"] = src.dense_mlp_type
        if src.dense_hidden != run_cfg.replace(hidden_size=src.hidden_size).dense_hidden:
            out["mlp_ratio"] = want["mlp_ratio"]
    if src.num_heads != run_cfg.num_heads and (want != have):
        out["num_heads"] = src.num_heads
    if want.get("moe_placement") != have.get("moe_placement") and src.moe_placement != run_cfg.moe_placement:
        out["moe_placement"] = src.moe_placement
    if src.is_moe and (not 1 <= run_cfg.top_k <= src.num_experts or run_cfg.top_k != src.top_k):
        out["top_k"] = src.top_k
    try:
        fitted = run_cfg.replace(**out).validate()
    except ValueError:
        return None
    return out if _signature(fitted) == want else None


def matching_registry_names(src: ModelConfig, run_cfg: ModelConfig) -> list[str]:
    """Registry names that, with this run's data (channels, classes, size), have the weights' shapes."""
    from ..registry import REGISTRY

    want = _signature(src)
    names = []
    for name, ref in REGISTRY.items():
        try:
            cand = ref.replace(in_channels=run_cfg.in_channels, num_classes=run_cfg.num_classes,
                               input_size=run_cfg.input_size, learn_sigma=src.learn_sigma).validate()
        except ValueError:
            continue
        if _signature(cand) == want:
            names.append(name)
    return names


ROUTER_STATE = ("bias", "threshold", "threshold_updates", "thresholds")


def _is_router_state(key: str) -> bool:
    """A router's persistent state buffer (`blocks.i.moe.gate.<name>`), not a trained weight."""
    head, _, name = key.rpartition(".")
    return head.endswith(".gate") and name in ROUTER_STATE


def _describe(cfg: ModelConfig) -> str:
    experts = f"{cfg.num_experts} {cfg.expert_type} experts (top-{cfg.top_k})" if cfg.is_moe else "dense"
    return (f"depth {cfg.depth}, hidden {cfg.hidden_size}, patch {cfg.patch_size}, {experts}, "
            f"{cfg.in_channels} input channel(s), learn_sigma {cfg.learn_sigma}")


def _mismatch_message(source: InitSource, run_cfg: ModelConfig, missing: list[str], unexpected: list[str],
                      bad: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> str:
    lines = [f"--init-from {source.path} ({source.kind}) does not fit this run's model {run_cfg.name!r} "
             f"({_describe(run_cfg)}; from --model, the --model-* overrides and the data):"]
    for k, got, want in bad[:8]:
        lines.append(f"  {k}: the weights have shape {got}, the run's model {want}")
    if len(bad) > 8:
        lines.append(f"  ... and {len(bad) - 8} more keys of another shape")
    if missing:
        lines.append(f"  in the run's model but not in the weights ({len(missing)}): {missing[:5]}")
    if unexpected:
        lines.append(f"  in the weights but not in the run's model ({len(unexpected)}): {unexpected[:5]}")
    src = source.config
    if src is not None and src.is_moe and run_cfg.is_moe and src.router != run_cfg.router and any(
            ".gate." in k for k in missing + unexpected):
        lines.append(f"The weights route with router {src.router}, this run with {run_cfg.router}, whose parameters "
                     f"differ; give --model-router {src.router} (router state such as biases and thresholds would "
                     "start fresh, but parameters such as prototypes or a capacity predictor cannot).")
    if src is not None:
        lines.append(f"The weights are {'' if source.config_recorded else 'by their shapes '}a model with {_describe(src)}.")
        if src.in_channels != run_cfg.in_channels:
            lines.append(f"They take {src.in_channels}-channel inputs and the data ({run_cfg.in_channels} channel(s)) "
                         "cannot feed them: fine-tune on data like theirs (4 channels = SD-VAE latents: a latent "
                         "cache from `ditmoe extract-latents`; 1 = grayscale: --grayscale true for image folders).")
        else:
            hints = []
            names = matching_registry_names(src, run_cfg)
            if names:
                sigma = "" if src.learn_sigma == run_cfg.learn_sigma else f" --model-learn-sigma {_flag_value(src.learn_sigma)}"
                hints.append(f"--model {names[0]}{sigma}" + (f" (or {', '.join(names[1:3])})" if len(names) > 1 else ""))
            overrides = suggest_overrides(src, run_cfg)
            if overrides:
                hints.append("these overrides on top of this run's --model: " + " ".join(
                    f"--model-{k.replace('_', '-')} {_flag_value(v)}" for k, v in overrides.items()))
            if hints:
                lines.append("To train the weights' architecture, give " + "; or ".join(hints) + ".")
    lines.append("Only the class count (label embedding) and the input size (fixed position table) may differ "
                 "from the weights'.")
    return "\n".join(lines)


__all__ = ["INIT_WEIGHTS", "InitSource", "InitReport", "check_init_from", "read_init_source", "init_model",
           "suggest_overrides", "matching_registry_names"]
