"""`ditmoe extract-latents`: encode an image folder with a VAE into a latent cache."""

from __future__ import annotations

import argparse
import os

from ..devices import resolve_device
from ._command import Command


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


def _extract_latents(args: argparse.Namespace) -> int:
    from ..data.latents import extract_latents, read_latent_metadata

    path = extract_latents(args.data, args.vae, args.out, image_size=args.image_size, batch_size=args.batch_size,
                           device=str(resolve_device(args.device)), num_workers=args.num_workers, overwrite=args.overwrite,
                           allow_upscale=args.allow_upscale, verify=args.verify_images)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reports for all
        return 0
    meta = read_latent_metadata(path)
    if meta.get("num_skipped"):
        print(f"left out {meta['num_skipped']} unreadable image file(s), e.g. {meta['skipped'][0]}")
    print(f"wrote {path} ({meta.get('num_images')} images)")
    return 0


COMMANDS = [
    Command("extract-latents", "encode an image folder (and each mirror) with a local VAE into a latent cache",
            _latents_args, _extract_latents),
]
