"""`ditmoe` command line: train | sample | eval | analyze | info | convert | upcycle | ...

Each subcommand lives in its own small function and imports what it needs on first use, so
`ditmoe --help` and `ditmoe info` start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_text: str):
    """Register `add_args` / `run` pairs for a subcommand."""

    def wrap(add_args):
        def with_run(run):
            COMMANDS[name] = (help_text, add_args, run)
            return run

        return with_run

    return wrap


# ------------------------------------------------------------------------------ info
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="registry name, e.g. DiT-MoE-S/2-8E2A (omit with --list)")
    p.add_argument("--list", action="store_true", help="list every registered model")
    p.add_argument("--image-size", type=int, default=256, help="image side for the GFLOPs count")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("info", "parameters, activated parameters and GFLOPs of a model")(_info_args)
def _info(args: argparse.Namespace) -> int:
    from .accounting import format_count, model_stats
    from .registry import get_config, model_names

    names = model_names() if args.list or not args.name else [args.name]
    rows = []
    for name in names:
        s = model_stats(get_config(name), image_size=args.image_size)
        rows.append(s)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    print(f"{'model':<22} {'total':>9} {'activated':>10} {'GFLOPs':>9} {'+attn':>9}   (one {args.image_size}x{args.image_size} image, {rows[0].tokens} tokens)")
    for s in rows:
        print(f"{s.name:<22} {format_count(s.total_params):>9} {format_count(s.activated_params):>10} "
              f"{s.gmacs:>9.2f} {s.gmacs_with_attention:>9.2f}")
    print("GFLOPs: multiply-accumulates of the linear layers (the paper's definition); +attn adds QK^T and AV.")
    return 0


# --------------------------------------------------------------------------- convert
def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint: official (.pt/.pth with or without an 'ema'/'model' wrapper, or "
                   ".safetensors), this package's, a training checkpoint, or a model folder (ditmoe or diffusers)")
    p.add_argument("dst", help="package / official: output .safetensors (config JSON beside it); "
                   "folder / diffusers: output folder")
    p.add_argument("--to", choices=["package", "official", "folder", "diffusers"], default="package",
                   help="package: this package's .safetensors; official: the official key layout; folder: a "
                   "ditmoe model folder (config.json + model.safetensors, any model); diffusers: a diffusers "
                   "DiTTransformer2DModel folder (dense DiT only)")
    p.add_argument("--from", dest="from_format", choices=["auto", "diffusers"], default="auto",
                   help="auto: recognise SRC (a folder whose config.json names DiTTransformer2DModel is read as "
                   "diffusers); diffusers: SRC must be a diffusers DiTTransformer2DModel folder")
    p.add_argument("--model", default=None, help="registry name to load into (default: inferred from the weights)")
    p.add_argument("--timestep-scale", type=float, default=None,
                   help="time convention of the checkpoint (1 for the released checkpoints)")


@command("convert", "convert checkpoints: official layout, this package, model folders, diffusers")(_convert_args)
def _convert(args: argparse.Namespace) -> int:
    from .convert import (atomic_write, check_checkpoint_path, check_output_dir, check_output_file,
                          export_official, load_model_and_info, run_process_near, save_model)

    if args.from_format == "diffusers":
        from .pretrained import is_diffusers_folder

        if not is_diffusers_folder(args.src):
            raise ValueError(f"--from diffusers: SRC {args.src} is not a diffusers model folder (a folder whose "
                             "config.json has \"_class_name\": \"DiTTransformer2DModel\", e.g. a DiTPipeline's "
                             "transformer/ subfolder)")
    check_checkpoint_path(args.src, "SRC")
    if args.to in ("folder", "diffusers"):
        dst = check_output_dir(args.dst, "DST")
        if Path(args.dst).resolve() == Path(args.src).resolve():
            raise ValueError(f"DST {args.dst} is SRC: write the converted model to another folder")
    else:
        check_output_file(args.dst, "DST", suffix=".safetensors")
    overrides = {} if args.timestep_scale is None else {"timestep_scale": args.timestep_scale}
    # A training checkpoint keeps the config and process it records (overrides that contradict
    # them are refused); other files get theirs from their metadata or the run folder they sit in.
    model, info = load_model_and_info(args.src, config=args.model, **overrides)
    process = info.get("process") or (None if Path(args.src).is_dir() else run_process_near(args.src))
    meta = {"weights": info["weights"], **({"process": process} if process else {})}
    if args.to == "package":
        save_model(model, args.dst, extra_meta=meta)
    elif args.to == "folder":
        from .pretrained import save_pretrained

        save_pretrained(model, dst, process=process, weights=info["weights"])
    elif args.to == "diffusers":
        from .export import save_diffusers

        save_diffusers(model, dst, process=process)
    else:
        from safetensors.torch import save_file

        sd = export_official(model)
        official = {"config": json.dumps(_official_ctor_args(model.config, process))}
        atomic_write(args.dst, lambda tmp: save_file(sd, tmp, metadata=official))
    print(f"wrote {args.dst} ({model.config.name}: depth {model.config.depth}, hidden {model.config.hidden_size}, "
          f"experts {model.config.num_experts}, timestep scale {model.config.timestep_scale:g}, "
          f"process {process or 'not recorded (sample assumes ddpm unless --process flow)'})")
    if args.to == "diffusers":
        print("diffusers' DiT embeds timesteps with downscale_freq_shift=1 where DiT uses 0: call "
              "ditmoe.export.exact_time_embedding(module) after DiTTransformer2DModel.from_pretrained for this "
              "model's exact function (docs/export.md)"
              + (f"; this model embeds t * {model.config.timestep_scale:g}, so pass timesteps scaled by that"
                 if model.config.timestep_scale != 1 else ""))
    return 0


def _official_ctor_args(cfg, process: str | None = None) -> dict:
    """The official constructor's argument names, so the metadata reads like theirs; the time
    convention and the process ride along so that reading the file back gives the same model."""
    d = dict(input_size=cfg.input_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
             hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
             class_dropout_prob=cfg.class_dropout_prob, num_classes=cfg.num_classes, learn_sigma=cfg.learn_sigma)
    if cfg.num_experts:
        d.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                 use_flash_attn=cfg.attn_layout == "fused_qknorm")
        if cfg.norm_topk:
            d["norm_topk"] = True
    if cfg.timestep_scale != 1.0:
        d["timestep_scale"] = cfg.timestep_scale
    if process:
        d["process"] = process
    return d


# --------------------------------------------------------------------------- upcycle
def _upcycle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="dense checkpoint: official DiT (GELU MLPs) or this package's dense model")
    p.add_argument("dst", help="output .safetensors")
    p.add_argument("--experts", type=int, default=8, help="routed experts per layer")
    p.add_argument("--top-k", type=int, default=2, help="experts chosen per token")
    p.add_argument("--no-renormalize", action="store_true",
                   help="keep raw softmax top-k weights (then the upcycled model no longer equals the dense one)")
    p.add_argument("--shared-hidden", type=int, default=0, help="width of a new shared expert (0 = none); it starts as a no-op")
    p.add_argument("--router-std", type=float, default=0.02, help="std of the new router weights")
    p.add_argument("--noise", type=float, default=0.0, help="relative std of noise added to each expert copy")
    p.add_argument("--seed", type=int, default=0)


@command("upcycle", "turn a dense DiT checkpoint into a DiT-MoE (experts copied from the dense MLP)")(_upcycle_args)
def _upcycle(args: argparse.Namespace) -> int:
    from .convert import (check_checkpoint_path, check_output_file, load_model_and_info, run_process_near,
                          save_model, upcycle)

    check_checkpoint_path(args.src, "SRC")
    check_output_file(args.dst, "DST", suffix=".safetensors")
    if args.experts < 1 or not 1 <= args.top_k <= args.experts:
        raise ValueError(f"--experts must be at least 1 and --top-k between 1 and --experts, got --experts "
                         f"{args.experts} --top-k {args.top_k}")
    dense, info = load_model_and_info(args.src)
    process = info.get("process") or run_process_near(args.src)  # the upcycled model keeps the dense one's
    model = upcycle(dense, num_experts=args.experts, top_k=args.top_k, norm_topk=not args.no_renormalize,
                    shared_hidden=args.shared_hidden, router_std=args.router_std, noise_std=args.noise, seed=args.seed)
    save_model(model, args.dst, extra_meta={"process": process} if process else None)
    print(f"wrote {args.dst}: {model.config.name} ({args.experts} experts, top-{args.top_k})")
    return 0


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    _register_heavy_commands()
    parser = argparse.ArgumentParser(prog="ditmoe", description="Sparse Mixture-of-Experts diffusion transformers (DiT-MoE).")
    parser.add_argument("--version", action="version", version=f"ditmoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_args(p)
    return parser


def _register_heavy_commands() -> None:
    """Commands defined in other modules register themselves on import (kept cheap: no torch)."""
    from . import commands, commands_generate, commands_report  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from .cpu_allocator import keep_freed_memory

    keep_freed_memory()  # page faults on freshly mapped tensors otherwise cost CPU runs up to 40% of their time
    import os

    try:
        return COMMANDS[args.command][2](args) or 0
    except (ValueError, FileNotFoundError) as e:
        # Bad input: one clear line, no traceback (DITMOE_DEBUG=1 shows it).
        if os.environ.get("DITMOE_DEBUG"):
            raise
        print(f"ditmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # The machine refused a read or write (full disk, read-only folder): name the file and the remedy.
        if os.environ.get("DITMOE_DEBUG"):
            raise
        print(f"ditmoe {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from .convert import _is_torch_write_failure, disk_write_error

        if not _is_torch_write_failure(e) or os.environ.get("DITMOE_DEBUG"):
            raise
        print(f"ditmoe {args.command}: error: {describe_os_error(disk_write_error('', e))}", file=sys.stderr)
        return 1


def describe_os_error(e: OSError) -> str:
    """One line: what failed on which path, and what to do about it."""
    import errno

    where = f" {e.filename}" if e.filename else ""
    what = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        return f"writing{where} failed: no space left on the device ({what}); free space or write elsewhere"
    if e.errno == errno.EDQUOT:
        return f"writing{where} failed: disk quota exceeded ({what}); free space or write elsewhere"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write or read{where} ({what}); choose a writable folder or fix its permissions"
    if e.errno == errno.EISDIR:
        return f"{where.strip()} is a folder where a file was expected ({what})"
    if e.errno == errno.ENOTDIR:
        return f"a part of{where} is a file where a folder was expected ({what})"
    return f"{'I/O error on' + where if where else 'I/O error'}: {what} (errno {e.errno})"
