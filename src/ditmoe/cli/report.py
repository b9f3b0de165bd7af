"""`ditmoe report RUN_DIR`: one self-contained HTML page for a training run."""

from __future__ import annotations

import argparse

from ._command import Command


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run's folder (what `ditmoe train --out DIR` wrote)")
    p.add_argument("--out", default=None, help="where to write the page (default: RUN_DIR/report.html)")


def _report(args: argparse.Namespace) -> int:
    from ..run_report import write_run_report

    path = write_run_report(args.run_dir, args.out)
    print(f"wrote {path} (one file, every image embedded: open it in a browser)")
    return 0


COMMANDS = [Command("report", "one self-contained HTML page for a run: settings, curves, expert load, samples, "
                    "evaluation, routing findings", _report_args, _report)]
