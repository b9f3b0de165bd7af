"""`ditmoe sample | analyze`: images from a checkpoint, and which experts fire while making them."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..config import DEFAULT_CFG_SCALE, PROCESS_SAMPLERS, PROCESSES, SAMPLER_STEPS, default_sampler, default_steps
from ..devices import resolve_device
from ._command import Command

# "250 ddpm, 50 ddim/euler, 25 heun": the default step counts, from the one table in config.py
_STEPS_TEXT = ", ".join(f"{n} {'/'.join(s for s, k in SAMPLER_STEPS.items() if k == n)}"
                        for n in dict.fromkeys(SAMPLER_STEPS.values()))
_SAMPLER_TEXT = ", ".join(f"{default_sampler(p)} for {'DDPM' if p == 'ddpm' else p} models" for p in PROCESS_SAMPLERS)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="training checkpoint (.pt), model_ema.safetensors, or an official checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="for training checkpoints: the EMA weights (default, what results use) or the raw ones")
    p.add_argument("--process", choices=list(PROCESSES), default=None,
                   help="process the model was trained with (default: read from the run's config)")
    p.add_argument("--sampler", choices=list(SAMPLER_STEPS), default=None,
                   help=f"default: the one the run recorded, else {_SAMPLER_TEXT}")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (default: the run's recorded steps for its sampler, else {_STEPS_TEXT})")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help=f"classifier-free guidance scale, 1 = none (default: the run's recorded scale, else {DEFAULT_CFG_SCALE})")
    p.add_argument("--cfg-channels", default="all", help="'all' (standard) or '3' (the official code's legacy guidance)")
    p.add_argument("--shift", type=float, default=1.0, help="time shift for flow samplers")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--vae", default=None, help="local folder of an SD-type VAE, to decode latent models")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true")


def _check_sampling_args(args: argparse.Namespace) -> None:
    """Refuse values that would sample something other than what was asked, before any work."""
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps} (leave it out for the sampler's default: "
                         f"{_STEPS_TEXT})")
    if args.cfg_scale is not None and args.cfg_scale < 0:
        raise ValueError(f"--cfg-scale must be >= 0, got {args.cfg_scale}: 1 = no guidance, larger values push "
                         "samples towards their class (1.5 to 4 is usual), 0 = unconditional")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.shift <= 0:
        raise ValueError(f"--shift must be > 0, got {args.shift} (1 = no time shift)")
    if args.eta < 0:
        raise ValueError(f"--eta must be >= 0, got {args.eta} (0 = deterministic DDIM)")
    _cfg_channels(args.cfg_channels)
    if args.vae is not None and not Path(args.vae).is_dir():
        raise FileNotFoundError(f"--vae {args.vae} is not a folder: pass a local Stable-Diffusion VAE folder")


def _load_checked(args: argparse.Namespace):
    """Device, checkpoint path and output folder checked before loading; the loaded model and the
    output folder, the sampler checked against the model's process."""
    from ..convert import check_checkpoint_path
    from ..generate import load_for_sampling
    from ..weights_io import check_output_dir

    device = resolve_device(args.device)
    check_checkpoint_path(args.ckpt, "--ckpt")
    out = check_output_dir(args.out)
    loaded = load_for_sampling(args.ckpt, args.weights, args.process, device)
    _check_sampler_fits(args, loaded.process)
    _resolve_sampling(args, loaded)
    return loaded, out


def _resolve_sampling(args: argparse.Namespace, loaded) -> None:
    """Fill in the sampler, steps and guidance scale that no flag gave: the run's recorded settings
    (its recipe was tuned for them), else the built-in defaults. Says which were used."""
    rec = loaded.sampling or {}
    given = [name for name in ("sampler", "steps", "cfg_scale") if getattr(args, name) is not None]
    args.sampler = args.sampler or rec.get("sampler") or default_sampler(loaded.process)
    # Recorded steps belong to the recorded sampler; another sampler takes its own default.
    rec_steps = rec.get("steps") if rec.get("sampler") == args.sampler else None
    args.steps = args.steps or rec_steps or default_steps(args.sampler)
    args.cfg_scale = args.cfg_scale if args.cfg_scale is not None else rec.get("cfg_scale", DEFAULT_CFG_SCALE)
    source = "recorded with the run" if rec else "built-in defaults"
    args.sampling_source = source if not given else f"{source}; from flags: {', '.join(given)}"


def _check_sampler_fits(args: argparse.Namespace, process: str) -> None:
    if args.sampler is not None and args.sampler not in PROCESS_SAMPLERS[process]:
        raise ValueError(f"--sampler {args.sampler} does not sample a {process} model; choose one of "
                         f"{', '.join(PROCESS_SAMPLERS[process])} (or pass --process if the model's process was "
                         "read wrongly)")


def _decoder(args, model):
    """The VAE decode for latent models; None for pixel-space models."""
    cfg = model.config
    if cfg.in_channels in (1, 3) and args.vae is None:
        return None
    if args.vae is None:
        raise ValueError(f"this model works in a {cfg.in_channels}-channel latent space: pass --vae DIR "
                         "(a local Stable-Diffusion VAE folder) to decode its samples into images")
    from ..data.vae import VAE

    vae = VAE.from_pretrained(args.vae, device=next(model.parameters()).device)
    return vae.decode


def _cfg_channels(spec: str):
    if spec == "all":
        return "all"
    if spec == "3":
        return 3
    raise ValueError(f"--cfg-channels must be 'all' or '3', got {spec!r}")


# ------------------------------------------------------------------------------ sample
def _sample_args(p: argparse.ArgumentParser) -> None:
    _add_sampling_args(p)
    p.add_argument("--classes", default="all", help="'all' or comma-separated class ids")
    p.add_argument("--per-class", type=int, default=10, help="images per requested class")
    p.add_argument("--num-images", type=int, default=None,
                   help="total images instead of --per-class (classes cycle through the selection)")
    p.add_argument("--grid-rows", type=int, default=None, help="images per grid row (default: --per-class)")
    p.add_argument("--max-grid", type=int, default=400, help="at most this many images in grid.png (0 = no grid)")
    p.add_argument("--singles", action="store_true", help="also write each image as its own PNG")


def _sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..generate import generate, parse_classes, save_grid, save_npz, save_singles, to_uint8_nhwc

    _check_sampling_args(args)
    if args.per_class < 1:
        raise ValueError(f"--per-class must be at least 1, got {args.per_class}")
    if args.num_images is not None and args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images} (leave it out to sample "
                         "--per-class images of each class)")
    if args.max_grid < 0:
        raise ValueError(f"--max-grid must be >= 0, got {args.max_grid} (0 = no grid.png)")
    if args.grid_rows is not None and args.grid_rows < 1:
        raise ValueError(f"--grid-rows must be at least 1, got {args.grid_rows}")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    loaded, out = _load_checked(args)
    model, cfg = loaded.model, loaded.model.config
    labels = parse_classes(args.classes, cfg.num_classes, args.per_class)
    if args.num_images is not None:
        reps = -(-args.num_images // len(labels))
        labels = labels.repeat(reps)[: args.num_images] if args.classes != "all" else \
            torch.arange(args.num_images) % cfg.num_classes
    indices = list(range(rank, len(labels), world))
    if rank == 0:
        note = "EMA weights" if loaded.weights == "ema" else ("raw (non-EMA) weights" if loaded.weights == "model" else "weights from file")
        print(f"sampling {len(labels)} images from {loaded.source} ({note}; process {loaded.process}; "
              f"{args.sampler} {args.steps} steps, cfg scale {args.cfg_scale}: {args.sampling_source}) on {world} process(es)")
    images = generate(model, loaded.process, labels[indices], sampler=args.sampler, steps=args.steps,
                      cfg_scale=args.cfg_scale, cfg_channels=_cfg_channels(args.cfg_channels), seed=args.seed,
                      batch_size=args.batch_size, indices=indices, shift=args.shift, eta=args.eta,
                      precision=args.precision, decode=_decoder(args, model), progress=not args.no_progress and rank == 0)
    arr = to_uint8_nhwc(images)
    out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        np.savez(out / f"part_{rank:04d}.npz", arr_0=arr, idx=np.array(indices))
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()
        if rank != 0:
            return 0
        full = np.zeros((len(labels),) + arr.shape[1:], dtype=np.uint8)
        for r in range(world):
            part = np.load(out / f"part_{r:04d}.npz")
            full[part["idx"]] = part["arr_0"]
            os.unlink(out / f"part_{r:04d}.npz")
        arr = full
    y = labels.numpy()
    npz = save_npz(arr, y, out / "samples.npz")
    nrow = args.grid_rows or (args.per_class if args.num_images is None else int(len(arr) ** 0.5) or 1)
    grid = save_grid(arr[: args.max_grid], out / "grid.png", nrow=nrow) if args.max_grid > 0 else None
    if args.singles:
        save_singles(arr, y, out / "images")
    (out / "sample_config.json").write_text(json.dumps({**vars(args), "process": loaded.process,
                                                        "weights": loaded.weights, "num_images": len(arr)}, indent=2))
    print(f"wrote {str(grid) + ' and ' if grid else ''}{npz} ({len(arr)} images, uint8 NHWC)")
    return 0


# ----------------------------------------------------------------------------- analyze
def _analyze_args(p: argparse.ArgumentParser) -> None:
    _add_sampling_args(p)
    p.add_argument("--per-class", type=int, default=10, help="images sampled per class")
    p.add_argument("--branch", choices=["cond", "uncond", "all"], default="cond",
                   help="which CFG branch the statistics describe (the paper uses the conditional one)")
    p.add_argument("--permutations", type=int, default=3, help="shuffles for the mutual-information baselines")


def _analyze(args: argparse.Namespace) -> int:
    import torch

    from ..analysis import RoutingRecorder, analyze_counts, make_figures, write_report
    from ..generate import generate

    _check_sampling_args(args)
    if args.per_class < 1:
        raise ValueError(f"--per-class must be at least 1, got {args.per_class}")
    if args.permutations < 1:
        raise ValueError(f"--permutations must be at least 1, got {args.permutations} (the mutual-information "
                         "baselines shuffle the labels this many times)")
    loaded, out = _load_checked(args)
    model, cfg = loaded.model, loaded.model.config
    if not cfg.is_moe:
        raise ValueError(f"{loaded.source} is a dense model: there are no experts to analyse")
    labels = torch.arange(cfg.num_classes).repeat_interleave(args.per_class)
    sampler, steps = args.sampler, args.steps
    # Heun evaluates the model twice per step; its callback numbering covers both evaluations.
    num_steps = steps * 2 if sampler == "heun" else steps
    out.mkdir(parents=True, exist_ok=True)
    print(f"analysing routing of {loaded.source}: {len(labels)} images ({args.per_class} per class), "
          f"{sampler} {steps} steps, cfg {args.cfg_scale} ({args.sampling_source})")
    with RoutingRecorder(model, num_steps, cfg.num_classes) as rec:
        generate(model, loaded.process, labels, sampler=sampler, steps=steps, cfg_scale=args.cfg_scale,
                 cfg_channels=_cfg_channels(args.cfg_channels), seed=args.seed, batch_size=args.batch_size,
                 shift=args.shift, eta=args.eta, precision=args.precision, recorder=rec, progress=not args.no_progress)
    results = rec.results()
    results.save(out / "routing_counts.npz")
    stats = analyze_counts(results, branch=args.branch, permutations=args.permutations, seed=args.seed)
    stats["setup"] = {"checkpoint": loaded.source, "weights": loaded.weights, "process": loaded.process,
                      "sampler": sampler, "steps": steps, "cfg_scale": args.cfg_scale, "per_class": args.per_class}
    figures = make_figures(results, stats, out)
    json_path, md_path = write_report(stats, out, figures)
    for key, f in stats.get("findings", {}).items():
        if isinstance(f, dict) and "holds" in f:
            verdict = {True: "holds", False: "does not hold", None: "cannot be tested"}[f["holds"]]
            print(f"finding {key}: {verdict}")
    print(f"wrote {md_path}, {json_path} and {len(figures)} figures in {out}")
    return 0


COMMANDS = [
    Command("sample", "sample images from a checkpoint: grid PNG, optional single PNGs, ADM-style .npz",
            _sample_args, _sample),
    Command("analyze", "which experts fire by class, position, step and layer: figures, stats.json, report.md",
            _analyze_args, _analyze),
]
