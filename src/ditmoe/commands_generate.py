"""Subcommands that sample from a checkpoint and look at the results: sample, analyze, eval,
extract-latents, train-classifier (registered into cli.COMMANDS)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .cli import command


def _add_sampling_args(p: argparse.ArgumentParser, default_sampler: str | None = None) -> None:
    p.add_argument("--ckpt", required=True, help="training checkpoint (.pt), model_ema.safetensors, or an official checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="for training checkpoints: the EMA weights (default, what results use) or the raw ones")
    p.add_argument("--process", choices=["flow", "ddpm"], default=None,
                   help="process the model was trained with (default: read from the run's config)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun"], default=default_sampler,
                   help="default: ddpm for DDPM models, euler for flow models")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 250 ddpm, 50 ddim/euler, 25 heun)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1 = none)")
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
                         "250 ddpm, 50 ddim/euler, 25 heun)")
    if args.cfg_scale < 0:
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


def _check_sampler_fits(args: argparse.Namespace, process: str) -> None:
    from .samplers import PROCESS_SAMPLERS

    if args.sampler is not None and args.sampler not in PROCESS_SAMPLERS[process]:
        raise ValueError(f"--sampler {args.sampler} does not sample a {process} model; choose one of "
                         f"{', '.join(PROCESS_SAMPLERS[process])} (or pass --process if the model's process was "
                         "read wrongly)")


def _device(arg: str | None):
    import torch

    if arg:
        try:
            device = torch.device(arg)
        except RuntimeError as e:
            raise ValueError(f"--device {arg!r} is not a device name: use cpu, cuda, cuda:N or mps") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {arg}: this torch ({torch.__version__}) sees no CUDA GPU; "
                             "use --device cpu or leave --device out")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {arg}: only {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"--device {arg}: MPS is not available here; use --device cpu or leave --device out")
        return device
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _decoder(args, model):
    """The VAE decode for latent models; None for pixel-space models."""
    cfg = model.config
    if cfg.in_channels in (1, 3) and args.vae is None:
        return None
    if args.vae is None:
        raise ValueError(f"this model works in a {cfg.in_channels}-channel latent space: pass --vae DIR "
                         "(a local Stable-Diffusion VAE folder) to decode its samples into images")
    from .data.vae import VAE

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


@command("sample", "sample images from a checkpoint: grid PNG, optional single PNGs, ADM-style .npz")(_sample_args)
def _sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .generate import (default_steps, generate, load_for_sampling, parse_classes, save_grid, save_npz,
                           save_singles, to_uint8_nhwc)
    from .samplers import PROCESS_SAMPLERS

    from .convert import check_checkpoint_path, check_output_dir

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
    device = _device(args.device)
    check_checkpoint_path(args.ckpt, "--ckpt")
    out = check_output_dir(args.out)
    loaded = load_for_sampling(args.ckpt, args.weights, args.process, device)
    _check_sampler_fits(args, loaded.process)
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
              f"cfg scale {args.cfg_scale}) on {world} process(es)")
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
    sampler = args.sampler or PROCESS_SAMPLERS[loaded.process][0]
    (out / "sample_config.json").write_text(json.dumps({**vars(args), "process": loaded.process, "sampler": sampler,
                                                        "steps": args.steps or default_steps(sampler),
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


@command("analyze", "which experts fire by class, position, step and layer: figures, stats.json, report.md")(_analyze_args)
def _analyze(args: argparse.Namespace) -> int:
    import torch

    from .analysis import RoutingRecorder, analyze_counts, make_figures, write_report
    from .generate import default_steps, generate, load_for_sampling

    from .convert import check_checkpoint_path, check_output_dir

    _check_sampling_args(args)
    if args.per_class < 1:
        raise ValueError(f"--per-class must be at least 1, got {args.per_class}")
    if args.permutations < 1:
        raise ValueError(f"--permutations must be at least 1, got {args.permutations} (the mutual-information "
                         "baselines shuffle the labels this many times)")
    device = _device(args.device)
    check_checkpoint_path(args.ckpt, "--ckpt")
    out = check_output_dir(args.out)
    loaded = load_for_sampling(args.ckpt, args.weights, args.process, device)
    _check_sampler_fits(args, loaded.process)
    model, cfg = loaded.model, loaded.model.config
    if not cfg.is_moe:
        raise ValueError(f"{loaded.source} is a dense model: there are no experts to analyse")
    labels = torch.arange(cfg.num_classes).repeat_interleave(args.per_class)
    from .samplers import PROCESS_SAMPLERS

    sampler = args.sampler or PROCESS_SAMPLERS[loaded.process][0]
    steps = args.steps or default_steps(sampler)
    # Heun evaluates the model twice per step; its callback numbering covers both evaluations.
    num_steps = steps * 2 if sampler == "heun" else steps
    out.mkdir(parents=True, exist_ok=True)
    print(f"analysing routing of {loaded.source}: {len(labels)} images ({args.per_class} per class), "
          f"{sampler} {steps} steps, cfg {args.cfg_scale}")
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


# -------------------------------------------------------------------------------- eval
def mnist_reference_images():
    """The 10k MNIST test images padded to 32x32, uint8 NHWC: the reference set for MNIST FID."""
    from .data.mnist import load_mnist
    from .data.transforms import pad_to

    images, _ = load_mnist("test")
    return pad_to(images, 32)[..., None]


def ensure_mnist_classifier(path=None) -> Path:
    """Train (once) and cache the MNIST evaluation classifier; its test accuracy is printed."""
    from .eval.mnist_classifier import default_classifier_path, train_mnist_classifier

    path = Path(path) if path else default_classifier_path()
    if not path.is_file():
        print(f"training the MNIST evaluation classifier once (cached at {path})")
        train_mnist_classifier(path)
    return path


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", required=True, help=".npz of uint8 NHWC samples (arr_0; arr_1 = requested labels)")
    p.add_argument("--ref", required=True, help="reference: an .npz of images or of statistics (ditmoe ref), an image "
                   "folder (statistics built once at the samples' size and cached), or 'mnist' / 'digits'")
    p.add_argument("--extractor", choices=["auto", "mnist", "inception"], default="auto",
                   help="auto: the MNIST classifier for 1-channel 28/32 px images, InceptionV3 otherwise")
    p.add_argument("--inception-weights", default=None, help="local pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--save-ref-stats", default=None, help="also cache the reference statistics here (.npz)")
    p.add_argument("--max-ref-images", type=int, default=None,
                   help="for a folder / named reference: use a fixed random subset of this many images")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--device", default=None)


def _reference_source(ref: str) -> str:
    """"named", "folder" or "npz" for a --ref / --data value (existence is checked by the readers)."""
    from .eval.reference import NAMED

    if ref.lower() in NAMED and not Path(ref).exists():
        return "named"
    return "folder" if Path(ref).is_dir() else "npz"


@command("eval", "FID, sFID, Inception Score, precision / recall (and class agreement for MNIST)")(_eval_args)
def _eval(args: argparse.Namespace) -> int:
    from .convert import atomic_write, check_output_file
    from .eval.evaluate import compute_reference_stats, evaluate, format_results, get_extractor, is_mnist_like
    from .eval.npz import load_samples_npz

    # Every input and output is checked before the classifier is trained or any feature computed.
    if args.out:
        check_output_file(args.out, "--out")
    if args.save_ref_stats:
        check_output_file(args.save_ref_stats, "--save-ref-stats")
    if args.max_ref_images is not None and args.max_ref_images < 2:
        raise ValueError(f"--max-ref-images must be at least 2, got {args.max_ref_images}")
    device = str(_device(args.device))
    images, labels = load_samples_npz(args.samples)
    kind = _reference_source(args.ref)
    if kind == "npz":
        from .eval.npz import check_reference_npz

        check_reference_npz(args.ref)
    elif kind == "folder":
        from .eval.reference import list_folder_images

        list_folder_images(args.ref)  # an empty or image-less folder is refused before any work
    mnist = args.extractor == "mnist" or (args.extractor == "auto" and is_mnist_like(images))
    if mnist and labels is not None and len(labels) and (labels.min() < 0 or labels.max() > 9):
        bad = sorted(set(labels[(labels < 0) | (labels > 9)].tolist()))
        raise ValueError(f"{args.samples}: arr_1 holds labels {bad[:5]} outside the MNIST classes 0..9; arr_1 must be "
                         "the class each sample was asked for (leave it out to skip class agreement)")
    if mnist:
        ensure_mnist_classifier()
    ext = get_extractor(args.extractor, images, device=device, inception_weights=args.inception_weights)
    ref: str | Path = args.ref
    if kind != "npz":
        from .eval.reference import cached_reference

        # Keyed by the folder's files (names, sizes, mtimes), the extractor's weights and the
        # samples' size: built once, reused until one of them changes.
        ref, built = cached_reference(args.ref, ext, image_size=images.shape[1], max_images=args.max_ref_images,
                                      progress=True)
        print(f"{'built' if built else 'using cached'} reference statistics of {args.ref} ({ext.name}, "
              f"{images.shape[1]} px): {ref}")
    if args.save_ref_stats:
        if kind != "npz":
            import shutil

            atomic_write(args.save_ref_stats, lambda tmp: shutil.copyfile(ref, tmp))
        else:
            compute_reference_stats(ref, extractor=ext, out=args.save_ref_stats)
    result = evaluate(images, ref, extractor=ext, labels=labels, device=device, progress=True)
    result["samples"], result["ref"] = str(args.samples), str(args.ref)
    print(format_results(result))
    if args.out:
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
        print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------------- ref
def _ref_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="image folder (one subfolder per class, or the images directly "
                   "inside it), or 'mnist' (the MNIST test set, 32 px) / 'digits' (scikit-learn's test digits)")
    p.add_argument("--out", required=True, help="output .npz (mu, sigma, sFID statistics, features for "
                   "precision / recall, and the extractor they were made with)")
    p.add_argument("--extractor", choices=["auto", "mnist", "inception"], default="auto",
                   help="auto: the MNIST classifier for 1-channel 28/32 px images, InceptionV3 otherwise")
    p.add_argument("--inception-weights", default=None, help="local pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--image-size", type=int, default=None,
                   help="centre-crop and resize every image to N x N (the samples' size); default: the images' "
                   "own size, which must then be the same for all (mnist: 32, digits: 16)")
    p.add_argument("--max-images", type=int, default=None, help="a fixed random subset of this many images")
    p.add_argument("--batch-size", type=int, default=None, help="images per feature batch")
    p.add_argument("--device", default=None)


@command("ref", "reference statistics (FID / sFID / precision-recall) of an image folder, mnist or digits")(_ref_args)
def _ref(args: argparse.Namespace) -> int:
    from .convert import check_output_file
    from .eval.evaluate import get_extractor, is_mnist_like
    from .eval.reference import build_reference, list_folder_images, load_reference_images

    check_output_file(args.out, "--out", suffix=".npz")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if _reference_source(args.data) == "npz":
        if not Path(args.data).exists():
            raise FileNotFoundError(f"--data {args.data} does not exist: pass an image folder, 'mnist' or 'digits'")
        list_folder_images(args.data)  # says why a file is not reference data
    device = str(_device(args.device))
    images = load_reference_images(args.data, args.image_size, args.max_images)  # every image read first
    if args.extractor == "mnist" or (args.extractor == "auto" and is_mnist_like(images)):
        ensure_mnist_classifier()
    ext = get_extractor(args.extractor, images, device=device, batch_size=args.batch_size,
                        inception_weights=args.inception_weights)
    stats = build_reference(args.data, ext, out=args.out, images=images, progress=True)
    print(f"wrote {args.out}: {stats['num_images']} images of {stats['image_size']} px, extractor {ext.name} "
          f"(weights digest {stats['extractor_digest']}), features {stats['features'].shape[1]}"
          + (", sFID statistics" if "mu_s" in stats else ""))
    return 0


def _classifier_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="where to cache it (default: ~/.cache/ditmoe/mnist_classifier.safetensors)")
    p.add_argument("--force", action="store_true", help="retrain even if the cached file exists")


@command("train-classifier", "train (once) the small MNIST classifier whose features MNIST FID uses")(_classifier_args)
def _train_classifier(args: argparse.Namespace) -> int:
    from .eval.mnist_classifier import default_classifier_path, train_mnist_classifier

    path = Path(args.out) if args.out else default_classifier_path()
    if path.is_file() and not args.force:
        print(f"{path} exists (use --force to retrain)")
        return 0
    train_mnist_classifier(path)
    return 0


# ---------------------------------------------------------------------- extract-latents
def _latents_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="image folder with one subfolder per class")
    p.add_argument("--vae", required=True, help="local folder of a Stable-Diffusion-type VAE (diffusers AutoencoderKL)")
    p.add_argument("--out", required=True, help="output latent cache (.safetensors)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--allow-upscale", action="store_true",
                   help="upscale (bicubic) images smaller than --image-size instead of refusing the folder")
    p.add_argument("--verify-images", choices=["fast", "full", "none"], default="fast",
                   help="check every image before encoding: fast (headers and structure), full (decode each once; "
                        "also finds truncated JPEGs) or none; unreadable files are left out and reported")


@command("extract-latents", "encode an image folder (and each mirror) with a local VAE into a latent cache")(_latents_args)
def _extract_latents(args: argparse.Namespace) -> int:
    from .data.latents import extract_latents, read_latent_metadata

    path = extract_latents(args.data, args.vae, args.out, image_size=args.image_size, batch_size=args.batch_size,
                           device=str(_device(args.device)), num_workers=args.num_workers, overwrite=args.overwrite,
                           allow_upscale=args.allow_upscale, verify=args.verify_images)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reports for all
        return 0
    meta = read_latent_metadata(path)
    if meta.get("num_skipped"):
        print(f"left out {meta['num_skipped']} unreadable image file(s), e.g. {meta['skipped'][0]}")
    print(f"wrote {path} ({meta.get('num_images')} images)")
    return 0
