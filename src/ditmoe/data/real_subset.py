"""Write N real MNIST training images (32x32, uint8 NHWC, labels in arr_1) as an ADM-style .npz.

Evaluated like generated samples, they give the floor of MNIST-classifier FID at that sample
count (FID is biased upwards for small N), so a model's number can be read against it:

    python -m ditmoe.data.real_subset --n 500 --out real_500.npz
"""

from __future__ import annotations

import argparse

import numpy as np


def real_subset(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from .mnist import load_mnist
    from .transforms import pad_to

    images, labels = load_mnist("train")
    idx = np.random.default_rng(seed).choice(len(images), size=n, replace=False)
    return pad_to(images[idx], 32)[..., None], labels[idx]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    images, labels = real_subset(a.n, a.seed)
    np.savez(a.out, arr_0=images, arr_1=labels)
    print(f"wrote {a.out}: {len(images)} real MNIST training images")


if __name__ == "__main__":
    main()
