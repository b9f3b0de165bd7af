"""What a training run shows and writes: a progress bar, CSV / TensorBoard logs, expert load."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import WANDB_MISSING, logger_kinds


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


def truncate_log(path: Path, step: int) -> int:
    """Keep the header and the rows of a step <= `step` in a CSV log whose first column is the step.

    A resumed run restarts at its checkpoint's step: rows logged after that checkpoint, before the
    run was stopped, would otherwise appear twice. A row cut short by a kill is dropped as well.
    Returns the number of rows dropped.
    """
    if not path.exists():
        return 0
    with open(path, newline="") as f:
        text = f.read()
    lines = text.splitlines(keepends=True)
    if not lines:
        return 0
    kept, dropped = [lines[0]], 0
    for line in lines[1:]:
        try:
            ok = line.endswith("\n") and int(line.split(",", 1)[0]) <= step
        except ValueError:
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if len(kept) == 1:  # no row left: the next writer starts the file, header included, afresh
        path.unlink()
    elif dropped:
        tmp = path.with_name(f".{path.name}.truncate.tmp")
        with open(tmp, "w", newline="") as f:
            f.write("".join(kept))
        tmp.replace(path)
    return dropped


class RunLogger:
    """metrics.csv (one row per log step) and expert_load.csv (step, layer, one column per expert),
    plus TensorBoard and / or Weights & Biases where `kind` names them ("tensorboard", "wandb",
    "tensorboard,wandb"; "csv" for the CSV files only).

    TensorBoard gets every metric as a scalar `train/<name>`, per-layer expert load as a histogram
    `expert_load/layer_XX` (balanced routing: every expert's fraction near 1/E) and as an image
    `expert_load/layers_x_experts` (rows layers, columns experts), and the preview grids.

    `start_step`: the step the run starts at; rows, TensorBoard events and preview images after
    it, left by an earlier attempt that was stopped after its last checkpoint, are removed.
    """

    def __init__(self, out: Path, enabled: bool, kind: str = "tensorboard", start_step: int = 0,
                 config: dict[str, Any] | None = None):
        self.enabled, self.out = enabled, Path(out)
        self._metrics_file = self._load_file = self._tb = self._wandb = None
        self._metric_keys: list[str] | None = None
        if not enabled:
            return
        kinds = logger_kinds(kind)
        self.out.mkdir(parents=True, exist_ok=True)
        if "wandb" in kinds:  # first: a missing package fails before any log is touched
            self._wandb_lib, self._wandb = _start_wandb(self.out, start_step, config)
        for name in ("metrics.csv", "expert_load.csv"):
            truncate_log(self.out / name, start_step)
        truncate_previews(self.out / "previews", start_step)
        if "tensorboard" in kinds:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("logger 'tensorboard' needs the tensorboard package: pip install tensorboard "
                                 "(or train with --logger csv)") from e
            # purge_step drops the events of steps after the resumed one that an earlier attempt wrote.
            self._tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, float], loads: dict[int, list[float]]) -> None:
        if not self.enabled:
            return
        if self._metrics_file is None:
            path = self.out / "metrics.csv"
            header = _csv_header(path)
            self._metrics_file = open(path, "a", newline="")
            # Appending to a resumed run's log keeps its columns (grad_norm may come and go).
            self._metric_keys = header or ["step"] + sorted(metrics)
            self._metrics_writer = csv.DictWriter(self._metrics_file, fieldnames=self._metric_keys, extrasaction="ignore")
            if not header:
                self._metrics_writer.writeheader()
        self._metrics_writer.writerow({"step": step, **metrics})
        self._metrics_file.flush()
        if loads:
            if self._load_file is None:
                path = self.out / "expert_load.csv"
                header = _csv_header(path)
                self._load_file = open(path, "a", newline="")
                self._load_writer = csv.writer(self._load_file)
                if not header:
                    n = len(next(iter(loads.values())))
                    self._load_writer.writerow(["step", "layer"] + [f"expert_{e}" for e in range(n)])
            for layer, fr in loads.items():
                self._load_writer.writerow([step, layer] + [f"{v:.5f}" for v in fr])
            self._load_file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"train/{k}", v, step)
            for layer, fr in loads.items():
                self._tb.add_histogram(f"expert_load/layer_{layer:02d}", torch.tensor(fr, dtype=torch.float64), step)
            if loads:
                self._tb.add_image("expert_load/layers_x_experts", load_heatmap(loads), step, dataformats="HWC")
            self._tb.flush()
        if self._wandb is not None:
            row: dict[str, Any] = {f"train/{k}": v for k, v in metrics.items()}
            if loads:
                row["expert_load/layers_x_experts"] = self._wandb_lib.Image(load_heatmap(loads))
            self._wandb.log(row, step=step)

    def log_image(self, tag: str, step: int, image: np.ndarray) -> None:
        """A uint8 (H, W, C) image (C = 1 or 3) to TensorBoard / W&B at `step`."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({tag: self._wandb_lib.Image(image[..., 0] if image.shape[-1] == 1 else image)}, step=step)

    def close(self) -> None:
        for f in (self._metrics_file, self._load_file):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(out: Path, start_step: int, config: dict[str, Any] | None):
    """The wandb module and a W&B run in OUT/wandb (WANDB_MODE=offline and the other WANDB_* variables apply).

    The run id is kept in OUT/wandb/ditmoe_run_id: a resumed run (start_step > 0) continues the
    same W&B run, a fresh one starts a new id.
    """
    try:
        import wandb
    except ImportError as e:
        raise ValueError(WANDB_MISSING) from e
    import secrets

    folder = out / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / "ditmoe_run_id"
    run_id = id_file.read_text().strip() if start_step and id_file.exists() else ""
    if not run_id:
        run_id = secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ditmoe"), name=out.resolve().name, id=run_id,
                     resume="allow", dir=str(out), config=config or {})
    return wandb, run


def load_heatmap(loads: dict[int, list[float]], cell: int = 8) -> np.ndarray:
    """uint8 (H, W, 3) image of per-layer expert load: one row per MoE layer, one column per expert.

    Colour is load x num_experts on a fixed scale (viridis, 0 to 2): the balanced 1/E is the
    middle of the scale, so images of different steps compare directly.
    """
    from matplotlib import colormaps

    rows = np.array([loads[k] for k in sorted(loads)], dtype=np.float64)
    rel = np.clip(rows * rows.shape[1] / 2.0, 0.0, 1.0)
    rgb = (colormaps["viridis"](rel)[..., :3] * 255).round().astype(np.uint8)
    return rgb.repeat(cell, axis=0).repeat(cell, axis=1)


def truncate_previews(folder: Path, step: int) -> int:
    """Delete preview grids `step_XXXXXXX.png` of a step after `step`; returns how many."""
    removed = 0
    if folder.is_dir():
        for p in folder.glob("step_*.png"):
            try:
                later = int(p.stem.split("_", 1)[1]) > step
            except ValueError:
                continue
            if later:
                p.unlink(missing_ok=True)
                removed += 1
    return removed


def _csv_header(path: Path) -> list[str] | None:
    """The header row of an existing, non-empty CSV file, else None."""
    if not path.exists():
        return None
    with open(path, newline="") as f:
        row = next(csv.reader(f), None)
    return row or None


class ExpertLoadTracker:
    """Counts (token, expert) pairs per expert in every MoE layer while training, and the tokens
    that went to no routed expert (capacity- and threshold-based routers); counts stay on the device."""

    def __init__(self, model: torch.nn.Module):
        self.layers = model.moe_layers() if hasattr(model, "moe_layers") else []
        self.counts: dict[int, torch.Tensor] = {}
        self.tokens: torch.Tensor | None = None  # [tokens seen, tokens without a routed expert], all layers

    def __enter__(self) -> "ExpertLoadTracker":
        for i, moe in self.layers:
            self.counts[i] = torch.zeros(moe.num_experts, dtype=torch.long, device=moe.gate.weight.device)
            moe.observer = self._observer(i)
        if self.layers:
            self.tokens = torch.zeros(2, dtype=torch.long, device=self.layers[0][1].gate.weight.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        for _, moe in self.layers:
            moe.observer = None

    def _observer(self, layer: int):
        def observe(moe, a, n):
            self.counts[layer] += torch.bincount(a.expert, minlength=moe.num_experts)
            if not a.k:  # top-k assignments route every token
                unrouted = (a.pairs_per_token() == 0).sum()
                self.tokens += torch.stack([unrouted.new_tensor(a.num_tokens), unrouted])
            else:
                self.tokens[0] += a.num_tokens

        return observe

    def unrouted_fraction_and_reset(self) -> float:
        """Share of (token, layer) routings since the last call that went to no routed expert."""
        if self.tokens is None:
            return 0.0
        seen, unrouted = self.tokens.tolist()
        self.tokens.zero_()
        return unrouted / seen if seen else 0.0

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
