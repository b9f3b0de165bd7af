"""Shared test set-up: one thread per test process (two cores, and multi-process tests)."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures" / "official"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
