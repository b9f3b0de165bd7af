"""`ditmoe study`: dense against each router at matched activated compute, and the ablations."""

from __future__ import annotations

import argparse

from ._command import Command


# ----------------------------------------------------------------------------- study
def _study_args(p: argparse.ArgumentParser) -> None:
    from ..study import DEFAULT_SAMPLES_PER_CLASS, DEFAULT_SEEDS, DEFAULT_STEPS

    p.add_argument("--out", default="runs/study", help="output folder: OUT/<variant>/seed<k>, study.json, figures")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help="optimizer steps per run, the same for every variant (the default fits the default "
                        "study, 11 variants x 3 seeds, in about 2.5 hours on 2 cores)")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                   help="comma-separated training seeds (seed = initialisation and data order)")
    p.add_argument("--variants", default="all", help="comma-separated subset of the variants (see --list), or 'all'")
    p.add_argument("--samples-per-class", type=int, default=DEFAULT_SAMPLES_PER_CLASS,
                   help="samples per digit for FID and class agreement (10 digits)")
    p.add_argument("--recipe", default=None, help="the training recipe; none = the repository's configs/mnist.yaml")
    p.add_argument("--list", action="store_true", help="list the variants with their activated MACs and notes, and exit")
    p.add_argument("--report", action="store_true",
                   help="print the Markdown report of the study in --out (tables, comparisons, verdicts) from its "
                        "study.json, redraw OUT/report.md and the figures from it, and exit; trains nothing")
    p.add_argument("--no-progress", action="store_true")


def _study(args: argparse.Namespace) -> int:
    from ..study import list_variants, make_study_figures, read_study, run_study

    if args.list:
        print(list_variants(recipe=args.recipe))
        return 0
    if args.report:
        from ..study_report import render_markdown, write_report

        doc = read_study(args.out)
        write_report(doc, args.out)
        make_study_figures(doc, args.out)
        print(render_markdown(doc))
        return 0
    # run_study checks every argument (steps, samples, seeds, recipe, variants) before any work.
    run_study(args.out, steps=args.steps, seeds=args.seeds, variants=args.variants,
              samples_per_class=args.samples_per_class, recipe=args.recipe, progress=not args.no_progress)
    return 0


COMMANDS = [
    Command("study", "dense vs each router at matched activated compute, and the ablations, over seeds, on MNIST",
            _study_args, _study),
]
