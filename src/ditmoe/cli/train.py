"""`ditmoe train`: its flags are made from the TrainConfig and ModelConfig fields (type, choices, help)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, get_type_hints

from ..config import ModelConfig, TrainConfig, check_field_types, field_type, load_config_file
from ._command import Command

_MODEL_FLAG_SKIP = {"name"}


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _parse_optional(parse):
    """`parse`, with none / null for None (a field annotated `X | None`)."""
    def parse_or_none(s: str):
        return None if s.lower() in ("none", "null") else parse(s)

    parse_or_none.__name__ = parse.__name__  # argparse names the type in its error message
    return parse_or_none


def _parse_list(choices: tuple[str, ...]):
    """A comma-separated list of `choices` (e.g. --logger tensorboard,wandb), kept as the string."""
    def parse(s: str) -> str:
        items = [k.strip() for k in s.split(",") if k.strip()]
        if not items or any(k not in choices for k in items):
            raise argparse.ArgumentTypeError(f"invalid choice: {s!r} (choose from {', '.join(choices)}, or a "
                                             "comma-separated list of them)")
        return s

    return parse


def flag_spec(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse keywords (type, choices, metavar) for a config field, from its annotation and its
    `choices` metadata (config.option)."""
    base, optional = field_type(hint)
    choices = f.metadata.get("choices")
    if choices is not None and f.metadata.get("many"):
        return {"type": _parse_list(choices), "metavar": "{" + ",".join(choices) + "}[,...]"}
    if choices is not None:
        return {"type": str, "choices": list(choices)}
    parse, metavar = {bool: (_parse_bool, "{true,false}"), int: (int, "INT"), float: (float, "FLOAT"),
                      str: (str, "STR")}[base]
    if optional:
        return {"type": _parse_optional(parse), "metavar": metavar + "|none"}
    return {"type": parse, "metavar": metavar}


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type, prefix: str = "", skip: set[str] = frozenset(),
                        defaults: Any = None, title: str | None = None) -> None:
    """One `--flag` per field of `cls`, typed from its annotation, with its help text and choices
    from the field's metadata and the default shown in --help. Flags default to SUPPRESS, so only
    those given override the config file; `defaults` (None: the dataclass's) is what --help shows."""
    group = p.add_argument_group(title) if title else p
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text: declare it with config.option(...)")
        default = getattr(defaults, f.name) if defaults is not None else f.default
        shown = "registry value" if prefix and default is None else repr(default)
        group.add_argument("--" + prefix + f.name.replace("_", "-"), dest=prefix.replace("-", "_") + f.name,
                           default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {shown})".replace("%", "%%"),
                           **flag_spec(f, hints[f.name]))


def train_config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any]]:
    """TrainConfig and model overrides from a config file (if any) and flags; flags win.

    Every config-file value is checked against the option's type here, so a wrong one is reported
    with the file, the key and the value.
    """
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
    return TrainConfig(**values).validate(), model_overrides


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=argparse.SUPPRESS, help="YAML or TOML file of training options "
                   "(and a model_overrides mapping); flags given here override it")
    add_dataclass_flags(p, TrainConfig, title="training")
    add_dataclass_flags(p, ModelConfig, prefix="model-", skip=_MODEL_FLAG_SKIP,
                        defaults=_unset_model_defaults(), title="model overrides (on top of --model)")


def _unset_model_defaults() -> Any:
    return type("Unset", (), {f.name: None for f in dataclasses.fields(ModelConfig)})()


def _train(args: argparse.Namespace) -> int:
    from ..train.loop import train

    cfg, overrides = train_config_from_args(args)
    train(cfg, overrides)
    return 0


COMMANDS = [
    Command("train", "train a DiT / DiT-MoE (runs under torchrun for DDP / FSDP)",
            _train_args, _train),
]
