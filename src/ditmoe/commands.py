"""Subcommands that drive training, sampling, evaluation and analysis (registered into cli.COMMANDS)."""

from __future__ import annotations
