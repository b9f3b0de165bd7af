"""Subcommands that drive training, sampling, evaluation and analysis (registered into cli.COMMANDS).

Flags of `ditmoe train` are generated from the TrainConfig and ModelConfig dataclasses, so the
dataclasses stay the single source of every option and its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, get_type_hints

from .cli import command
from .config import ModelConfig, TrainConfig

_MODEL_FLAG_SKIP = {"name"}


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _flag_type(tp: Any):
    text = str(tp)
    if tp is bool or text == "bool":
        return _parse_bool
    if tp is int or text == "int":
        return int
    if tp is float or text == "float":
        return float
    if "int" in text and "None" in text:
        return int
    return str


def field_comments(cls: type) -> dict[str, str]:
    """The `# ...` comment after each field of a config dataclass: the one place options are explained."""
    import inspect
    import re

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (frozen app): flags keep their defaults only
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.M)}


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type, prefix: str = "", skip: set[str] = frozenset(),
                        defaults: Any = None, title: str | None = None) -> None:
    """One `--flag` per field; the default shown in --help, SUPPRESS so only given flags override."""
    group = p.add_argument_group(title) if title else p
    hints = get_type_hints(cls)
    inst = defaults if defaults is not None else cls()
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        default = getattr(inst, f.name)
        shown = "registry value" if prefix and default is None else repr(default)
        group.add_argument(flag, dest=prefix.replace("-", "_") + f.name, type=_flag_type(hints[f.name]),
                           default=argparse.SUPPRESS, metavar=type(default).__name__.upper() if default is not None else "N",
                           help=(f"{comments[f.name]} " if f.name in comments else "").replace("%", "%%")
                           + f"(default: {shown})")


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


def train_config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any]]:
    """TrainConfig and model overrides from a config file (if any) and flags; flags win.

    Every config-file value is checked against the option's type here, so a wrong one is reported
    with the file, the key and the value.
    """
    from .config import check_field_types

    values: dict[str, Any] = {}
    model_overrides: dict[str, Any] = {}
    if getattr(args, "config", None):
        data = load_config_file(args.config)
        file_overrides = data.pop("model_overrides", {}) or {}
        if not isinstance(file_overrides, dict):
            raise ValueError(f"config file {args.config}: model_overrides must be a mapping of model option: value "
                             f"(e.g. `model_overrides: {{num_experts: 8}}`), got {file_overrides!r}")
        known_model = {f.name for f in dataclasses.fields(ModelConfig)} - _MODEL_FLAG_SKIP
        unknown_model = set(file_overrides) - known_model
        if unknown_model:
            raise ValueError(f"config file {args.config}: unknown model_overrides key(s) {sorted(unknown_model)}; "
                             f"known: {sorted(known_model)}")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"config file {args.config}: unknown training option(s) {sorted(unknown)}; "
                             "see `ditmoe train --help` (model options go under model_overrides)")
        model_overrides.update(check_field_types(ModelConfig, file_overrides, f"config file {args.config}: model_overrides"))
        values.update(check_field_types(TrainConfig, data, f"config file {args.config}"))
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    for f in dataclasses.fields(ModelConfig):
        if hasattr(args, "model_" + f.name):
            model_overrides[f.name] = getattr(args, "model_" + f.name)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown training option(s) {sorted(unknown)}; see `ditmoe train --help`")
    return TrainConfig(**values).validate(), model_overrides


# ----------------------------------------------------------------------------- train
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=argparse.SUPPRESS, help="YAML or TOML file of training options "
                   "(and a model_overrides mapping); flags given here override it")
    add_dataclass_flags(p, TrainConfig, title="training")
    add_dataclass_flags(p, ModelConfig, prefix="model-", skip=_MODEL_FLAG_SKIP,
                        defaults=_unset_model_defaults(), title="model overrides (on top of --model)")


def _unset_model_defaults() -> Any:
    return type("Unset", (), {f.name: None for f in dataclasses.fields(ModelConfig)})()


@command("train", "train a DiT / DiT-MoE (runs under torchrun for DDP / FSDP)")(_train_args)
def _train(args: argparse.Namespace) -> int:
    from .train.loop import train

    cfg, overrides = train_config_from_args(args)
    train(cfg, overrides)
    return 0


# ------------------------------------------------------------------------------ plan
def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registry name, e.g. DiT-MoE-G/2-16E2A")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB")
    p.add_argument("--batch", type=int, default=1024, help="global batch (images per optimizer step)")
    p.add_argument("--micro-batch", type=int, default=0, help="images per forward per GPU (0: batch / gpus)")
    p.add_argument("--ep", type=int, default=8, help="expert-parallel group size for the EP layouts")
    p.add_argument("--checkpointing", action="store_true", help="judge the fit with activation checkpointing")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--image-size", type=int, default=256, help="image side in pixels (latent = image / 8)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of GPU memory kept free")
    p.add_argument("--imbalance", type=float, default=1.0, help="busiest GPU's routed rows / the average (EP)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


@command("plan", "per-GPU memory and traffic of each parallel layout (DDP, FSDP, EP) for a model on N GPUs")(_plan_args)
def _plan(args: argparse.Namespace) -> int:
    from .plan import PlanInput, format_plan, param_counts, plan
    from .registry import get_config

    inp = PlanInput(get_config(args.model), gpus=args.gpus, gpu_mem_gib=args.gpu_mem, batch=args.batch,
                    micro_batch=args.micro_batch, ep=args.ep, checkpointing=args.checkpointing,
                    precision=args.precision, image_size=args.image_size, gpus_per_node=args.gpus_per_node,
                    headroom=args.headroom, imbalance=args.imbalance)
    plans = plan(inp)
    if args.json:
        counts = param_counts(inp.model)
        print(json.dumps({"parameters": dataclasses.asdict(counts), "layouts": [p.to_dict() for p in plans]}, indent=2))
    else:
        print(format_plan(inp, plans))
    return 0


# ----------------------------------------------------------------------------- study
def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/study", help="output folder (one run folder per variant)")
    p.add_argument("--steps", type=int, default=2200,
                   help="optimizer steps per variant (same for all; 2200 is the quickstart's budget, about 8 min each here)")
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, default=2, help="seeds of the dense-versus-MoE pair")
    p.add_argument("--samples-per-class", type=int, default=20, help="samples per class for FID / agreement")
    p.add_argument("--sample-steps", type=int, default=50, help="Euler steps when sampling")
    p.add_argument("--variants", default="all", help="comma-separated subset of the variant names, or 'all'")
    p.add_argument("--no-progress", action="store_true")


@command("study", "dense vs MoE at matched compute and the paper's ablations, on embedded MNIST")(_study_args)
def _study(args: argparse.Namespace) -> int:
    from .study import default_variants, run_study

    variants = default_variants(args.seeds)
    if args.variants != "all":
        wanted = [w.strip() for w in args.variants.split(",") if w.strip()]
        unknown = sorted(set(wanted) - {v.name for v in variants})
        if unknown:
            raise ValueError(f"unknown study variants {unknown}; known: {', '.join(v.name for v in variants)}")
        variants = [v for v in variants if v.name in wanted]
    run_study(args.out, steps=args.steps, global_batch=args.global_batch, lr=args.lr,
              samples_per_class=args.samples_per_class, sample_steps=args.sample_steps,
              variants=variants, progress=not args.no_progress)
    return 0
