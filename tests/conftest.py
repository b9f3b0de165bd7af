"""Shared test set-up: one thread per test process (two cores, and multi-process tests), and every
test starts from the same global random state, so a result never depends on which tests ran before."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures" / "official"


@pytest.fixture(autouse=True)
def _same_random_state_for_every_test():
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def compiler_fails(monkeypatch):
    """torch.compile'd functions raise on their first call (as without a C++ compiler), and the
    CPU kernels start uncompiled and not yet marked unavailable."""
    from ditmoe.kernels import cpu_kernels

    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with cpu_kernels.fresh_state():
        yield


def reference_center_crop(img, size: int):
    """A second, array-slicing statement of the ADM crop (the data code crops with PIL instead):
    BOX halvings while the short side is >= 2 * size, bicubic to short side == size, centre slice."""
    import numpy as np
    from PIL import Image

    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    f = size / min(img.size)
    img = img.resize((round(img.width * f), round(img.height * f)), resample=Image.BICUBIC)
    a = np.asarray(img)
    y0, x0 = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y0:y0 + size, x0:x0 + size]
