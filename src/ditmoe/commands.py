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


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type, prefix: str = "", skip: set[str] = frozenset(),
                        defaults: Any = None, title: str | None = None) -> None:
    """One `--flag` per field; the default shown in --help, SUPPRESS so only given flags override."""
    group = p.add_argument_group(title) if title else p
    hints = get_type_hints(cls)
    inst = defaults if defaults is not None else cls()
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        default = getattr(inst, f.name)
        shown = "registry value" if prefix and default is None else repr(default)
        group.add_argument(flag, dest=prefix.replace("-", "_") + f.name, type=_flag_type(hints[f.name]),
                           default=argparse.SUPPRESS, metavar=type(default).__name__.upper() if default is not None else "N",
                           help=f"(default: {shown})")


def load_config_file(path: str) -> dict[str, Any]:
    """YAML or TOML with TrainConfig keys and an optional `model_overrides` mapping."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of option: value")
    return data


def train_config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any]]:
    values: dict[str, Any] = {}
    model_overrides: dict[str, Any] = {}
    if getattr(args, "config", None):
        data = load_config_file(args.config)
        model_overrides.update(data.pop("model_overrides", {}) or {})
        values.update(data)
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
