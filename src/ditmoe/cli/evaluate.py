"""`ditmoe eval | ref | train-classifier`: FID and friends, reference statistics, the MNIST classifier."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..devices import resolve_device
from ._command import Command


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
    from ..eval.reference import NAMED

    if ref.lower() in NAMED and not Path(ref).exists():
        return "named"
    return "folder" if Path(ref).is_dir() else "npz"


def _eval(args: argparse.Namespace) -> int:
    from ..weights_io import atomic_write, check_output_file
    from ..eval.evaluate import compute_reference_stats, evaluate, format_results, get_extractor, is_mnist_like
    from ..eval.npz import load_samples_npz

    # Every input and output is checked before the classifier is trained or any feature computed.
    if args.out:
        check_output_file(args.out, "--out")
    if args.save_ref_stats:
        check_output_file(args.save_ref_stats, "--save-ref-stats")
    if args.max_ref_images is not None and args.max_ref_images < 2:
        raise ValueError(f"--max-ref-images must be at least 2, got {args.max_ref_images}")
    device = str(resolve_device(args.device))
    images, labels = load_samples_npz(args.samples)
    kind = _reference_source(args.ref)
    if kind == "npz":
        from ..eval.npz import check_reference_npz

        check_reference_npz(args.ref)
    elif kind == "folder":
        from ..eval.reference import list_folder_images

        list_folder_images(args.ref)  # an empty or image-less folder is refused before any work
    mnist = args.extractor == "mnist" or (args.extractor == "auto" and is_mnist_like(images))
    if mnist and labels is not None and len(labels) and (labels.min() < 0 or labels.max() > 9):
        bad = sorted(set(labels[(labels < 0) | (labels > 9)].tolist()))
        raise ValueError(f"{args.samples}: arr_1 holds labels {bad[:5]} outside the MNIST classes 0..9; arr_1 must be "
                         "the class each sample was asked for (leave it out to skip class agreement)")
    if mnist:
        from ..eval import mnist_classifier

        mnist_classifier.ensure_mnist_classifier()
    ext = get_extractor(args.extractor, images, device=device, inception_weights=args.inception_weights)
    ref: str | Path = args.ref
    if kind != "npz":
        from ..eval.reference import cached_reference

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


def _ref(args: argparse.Namespace) -> int:
    from ..weights_io import check_output_file
    from ..eval.evaluate import get_extractor, is_mnist_like
    from ..eval.reference import build_reference, list_folder_images, load_reference_images

    check_output_file(args.out, "--out", suffix=".npz")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if _reference_source(args.data) == "npz":
        if not Path(args.data).exists():
            raise FileNotFoundError(f"--data {args.data} does not exist: pass an image folder, 'mnist' or 'digits'")
        list_folder_images(args.data)  # says why a file is not reference data
    device = str(resolve_device(args.device))
    images = load_reference_images(args.data, args.image_size, args.max_images)  # every image read first
    if args.extractor == "mnist" or (args.extractor == "auto" and is_mnist_like(images)):
        from ..eval import mnist_classifier

        mnist_classifier.ensure_mnist_classifier()
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


def _train_classifier(args: argparse.Namespace) -> int:
    from ..eval.mnist_classifier import default_classifier_path, train_mnist_classifier

    path = Path(args.out) if args.out else default_classifier_path()
    if path.is_file() and not args.force:
        print(f"{path} exists (use --force to retrain)")
        return 0
    train_mnist_classifier(path)
    return 0


COMMANDS = [
    Command("eval", "FID, sFID, Inception Score, precision / recall (and class agreement for MNIST)",
            _eval_args, _eval),
    Command("ref", "reference statistics (FID / sFID / precision-recall) of an image folder, mnist or digits",
            _ref_args, _ref),
    Command("train-classifier", "train (once) the small MNIST classifier whose features MNIST FID uses",
            _classifier_args, _train_classifier),
]
