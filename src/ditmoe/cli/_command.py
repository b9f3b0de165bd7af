"""What each subcommand module of the CLI exports: `COMMANDS`, a list of `Command`s."""

from __future__ import annotations

import argparse
from typing import Callable, NamedTuple


class Command(NamedTuple):
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]  # declares the flags (imports nothing heavy)
    run: Callable[[argparse.Namespace], int]  # does the work; imports torch and the library on first use
