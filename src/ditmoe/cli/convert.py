"""`ditmoe info | convert | upcycle`: model sizes, checkpoint formats, dense -> MoE upcycling."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ROUTERS
from ._command import Command


# ------------------------------------------------------------------------------ info
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="registry name, e.g. DiT-MoE-S/2-8E2A (omit with --list)")
    p.add_argument("--list", action="store_true", help="list every registered model")
    p.add_argument("--image-size", type=int, default=256, help="image side for the GFLOPs count")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--router", default=None, choices=ROUTERS,
                   help="count the activated compute under this routing rule (default: the model's, topk_softmax)")


def _info(args: argparse.Namespace) -> int:
    from ..accounting import format_count, model_stats
    from ..registry import get_config, model_names

    names = model_names() if args.list or not args.name else [args.name]
    rows = []
    for name in names:
        cfg = get_config(name)
        if args.router and cfg.is_moe:
            cfg = cfg.replace(router=args.router).validate()
        s = model_stats(cfg, image_size=args.image_size)
        rows.append(s)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    print(f"{'model':<22} {'total':>9} {'activated':>10} {'GFLOPs':>9} {'+attn':>9}   (one {args.image_size}x{args.image_size} image, {rows[0].tokens} tokens)")
    for s in rows:
        print(f"{s.name:<22} {format_count(s.total_params):>9} {format_count(s.activated_params):>10} "
              f"{s.gmacs:>9.2f} {s.gmacs_with_attention:>9.2f}")
    print("GFLOPs: multiply-accumulates of the linear layers (the paper's definition); +attn adds QK^T and AV.")
    for note in dict.fromkeys(s.note for s in rows if s.note):
        print(f"activated compute under {note}")
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


def _convert(args: argparse.Namespace) -> int:
    from ..convert import check_checkpoint_path, export_official, load_model_and_info, run_process_near, save_model
    from ..weights_io import atomic_write, check_output_dir, check_output_file

    if args.from_format == "diffusers":
        from ..pretrained import is_diffusers_folder

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
    meta = {"weights": info["weights"], **({"process": process} if process else {}),
            **({"sampling": json.dumps(info["sampling"])} if info.get("sampling") else {})}
    if args.to == "official" and model.config.flow_prediction != "velocity":
        raise ValueError(f"{args.src} predicts {model.config.flow_prediction} (flow_prediction), which the official "
                         "code cannot run: it reads every flow output as a velocity; keep it in this package's format")
    if args.to == "package":
        save_model(model, args.dst, extra_meta=meta)
    elif args.to == "folder":
        from ..pretrained import save_pretrained

        save_pretrained(model, dst, process=process, weights=info["weights"])
    elif args.to == "diffusers":
        from ..export import save_diffusers

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


def _upcycle(args: argparse.Namespace) -> int:
    from ..convert import check_checkpoint_path, load_model_and_info, run_process_near, save_model, upcycle
    from ..weights_io import check_output_file

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


COMMANDS = [
    Command("info", "parameters, activated parameters and GFLOPs of a model",
            _info_args, _info),
    Command("convert", "convert checkpoints: official layout, this package, model folders, diffusers",
            _convert_args, _convert),
    Command("upcycle", "turn a dense DiT checkpoint into a DiT-MoE (experts copied from the dense MLP)",
            _upcycle_args, _upcycle),
]
