"""`ditmoe study`: dense against MoE at matched compute and the paper's ablations."""

from __future__ import annotations

import argparse

from ._command import Command


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


def _study(args: argparse.Namespace) -> int:
    from ..study import default_variants, run_study

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


COMMANDS = [
    Command("study", "dense vs MoE at matched compute and the paper's ablations, on embedded MNIST",
            _study_args, _study),
]
