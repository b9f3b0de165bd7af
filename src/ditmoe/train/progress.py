"""What a training run shows and writes: a progress bar, CSV / TensorBoard logs, expert load."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import torch


class Progress:
    """tqdm bar over optimizer steps with loss, balance loss and images/s (tqdm adds the ETA)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)
        self._last = start

    def set(self, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", bal=f"{metrics['balance']:.4f}",
                                 img_s=f"{metrics['images_per_s']:.0f}", refresh=False)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self._last)
        self._last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunLogger:
    """metrics.csv (one row per log step) and expert_load.csv (step, layer, one column per expert);
    optionally TensorBoard scalars as well."""

    def __init__(self, out: Path, enabled: bool, kind: str = "csv"):
        self.enabled, self.out = enabled, Path(out)
        self._metrics_file = self._load_file = self._tb = None
        self._metric_keys: list[str] | None = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("logger 'tensorboard' needs the tensorboard package: pip install tensorboard") from e
            self._tb = SummaryWriter(str(self.out / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float], loads: dict[int, list[float]]) -> None:
        if not self.enabled:
            return
        if self._metrics_file is None:
            path = self.out / "metrics.csv"
            new = not path.exists()
            self._metrics_file = open(path, "a", newline="")
            self._metric_keys = ["step"] + sorted(metrics)
            self._metrics_writer = csv.DictWriter(self._metrics_file, fieldnames=self._metric_keys, extrasaction="ignore")
            if new:
                self._metrics_writer.writeheader()
        self._metrics_writer.writerow({"step": step, **metrics})
        self._metrics_file.flush()
        if loads:
            if self._load_file is None:
                path = self.out / "expert_load.csv"
                new = not path.exists()
                self._load_file = open(path, "a", newline="")
                self._load_writer = csv.writer(self._load_file)
                if new:
                    n = len(next(iter(loads.values())))
                    self._load_writer.writerow(["step", "layer"] + [f"expert_{e}" for e in range(n)])
            for layer, fr in loads.items():
                self._load_writer.writerow([step, layer] + [f"{v:.5f}" for v in fr])
            self._load_file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        for f in (self._metrics_file, self._load_file):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()


class ExpertLoadTracker:
    """Counts tokens per expert in every MoE layer while training (counts stay on the device)."""

    def __init__(self, model: torch.nn.Module):
        self.layers = model.moe_layers() if hasattr(model, "moe_layers") else []
        self.counts: dict[int, torch.Tensor] = {}

    def __enter__(self) -> "ExpertLoadTracker":
        for i, moe in self.layers:
            self.counts[i] = torch.zeros(moe.num_experts, dtype=torch.long, device=moe.gate.weight.device)
            moe.observer = self._observer(i)
        return self

    def __exit__(self, *exc: Any) -> None:
        for _, moe in self.layers:
            moe.observer = None

    def _observer(self, layer: int):
        def observe(moe, topk_idx, topk_w):
            self.counts[layer] += torch.bincount(topk_idx.reshape(-1), minlength=moe.num_experts)

        return observe

    def fractions_and_reset(self) -> dict[int, list[float]]:
        out = {}
        for i, c in self.counts.items():
            total = int(c.sum())
            out[i] = (c.double() / max(total, 1)).tolist()
            c.zero_()
        return out

    @staticmethod
    def mean_cv(loads: dict[int, list[float]]) -> float:
        """Mean over layers of the coefficient of variation of per-expert load (0 = balanced)."""
        if not loads:
            return 0.0
        cvs = []
        for fr in loads.values():
            t = torch.tensor(fr, dtype=torch.float64)
            cvs.append(float(t.std(unbiased=False) / t.mean()) if t.mean() > 0 else 0.0)
        return sum(cvs) / len(cvs)
