"""`ditmoe` command line: train | sample | eval | analyze | info | convert | upcycle | ...

One module per group of subcommands, each exporting `COMMANDS`; this module imports them
explicitly and dispatches. The modules declare their flags without importing torch and import the
library on first use, so `ditmoe --help` and `ditmoe info` start fast. Nothing outside this
package imports it (tests/test_imports.py).
"""

from __future__ import annotations

import argparse
import sys

from . import convert, data, evaluate, generate, plan, report, study, train
from ._command import Command

# `ditmoe --help` lists the commands in this order.
COMMANDS: dict[str, Command] = {c.name: c for group in (convert, train, plan, study, generate, evaluate, data, report)
                                for c in group.COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="ditmoe", description="Sparse Mixture-of-Experts diffusion transformers (DiT-MoE).")
    parser.add_argument("--version", action="version", version=f"ditmoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for c in COMMANDS.values():
        p = sub.add_parser(c.name, help=c.help, description=c.help,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        c.add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from ..cpu_allocator import keep_freed_memory

    keep_freed_memory()  # page faults on freshly mapped tensors otherwise cost CPU runs up to 40% of their time
    import os

    try:
        return COMMANDS[args.command].run(args) or 0
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
        from ..weights_io import _is_torch_write_failure, disk_write_error

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


__all__ = ["COMMANDS", "Command", "build_parser", "describe_os_error", "main"]
