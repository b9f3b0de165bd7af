"""Figures of recorded routing: the paper's heatmaps (Figures 5 to 7), spatial maps, MI by layer.

matplotlib is imported inside `make_figures` and used through its object API with the Agg
canvas, so importing ditmoe never touches matplotlib and no global backend is changed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .recorder import RoutingResults
from .stats import branch_tables, row_normalize


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(a)), float(np.max(a))
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a, dtype=np.float64)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig


def _heatmaps(tables: np.ndarray, blocks: np.ndarray, ylabel: str, title: str, path: Path, dpi: int) -> Path:
    n = len(tables)
    ncols = min(n, 6)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(2.4 * ncols + 0.8, 2.8 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    im = None
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        im = ax.imshow(_minmax(row_normalize(tables[i])), aspect="auto", cmap="viridis",
                       interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(f"layer {int(blocks[i])}", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_xticks(range(tables[i].shape[1]))
        ax.tick_params(labelsize=6)
        if i % ncols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6, label="selection frequency (min-max per panel)")
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=dpi)
    return path


def _spatial_maps(res: RoutingResults, pos: np.ndarray, path: Path, dpi: int, branch: str,
                  tokens_seen: np.ndarray | None = None) -> Path:
    n_layers, t, e = pos.shape
    g = res.grid_size
    if g * g != t:
        raise ValueError(f"{t} token positions do not form a square grid")
    if tokens_seen is None:  # top-k: k pairs per token
        tokens = pos.sum(-1, keepdims=True) / res.top_k  # (L, T, 1) tokens seen at each position
    else:  # every image has one token at each position
        tokens = np.broadcast_to(np.asarray(tokens_seen, dtype=np.float64).reshape(-1, 1, 1) / t, (n_layers, t, 1))
    prob = np.divide(pos, tokens, out=np.zeros(pos.shape), where=tokens > 0)  # P(token at p picks e)
    vmax = float(prob.max()) if prob.size else 1.0
    fig = _new_figure(1.15 * e + 1.2, 1.15 * n_layers + 0.6)
    axes = fig.subplots(n_layers, e, squeeze=False)
    im = None
    for li in range(n_layers):
        for ei in range(e):
            ax = axes[li, ei]
            im = ax.imshow(prob[li, :, ei].reshape(g, g), cmap="magma", vmin=0, vmax=max(vmax, 1e-12),
                           interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if li == 0:
                ax.set_title(f"expert {ei}", fontsize=8)
            if ei == 0:
                ax.set_ylabel(f"layer {int(res.layers[li])}", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.5, label=f"P(token picks expert), uniform = {res.top_k / e:.2f}")
    fig.suptitle(f"Expert selection on the {g}x{g} patch grid ({branch} branch)", fontsize=11)
    fig.savefig(path, dpi=dpi)
    return path


def _mi_plot(stats: dict[str, Any], path: Path, dpi: int) -> Path:
    lays = stats["layers"]
    x = np.array([lay["layer"] for lay in lays])
    colors = {"class": "tab:blue", "position": "tab:orange", "step": "tab:green"}
    fig = _new_figure(11, 4)
    ax1, ax2 = fig.subplots(1, 2)

    def val(v: Any) -> float:
        return np.nan if v is None else float(v)

    width = 0.8 / 3
    for j, (name, c) in enumerate(colors.items()):
        mi = np.array([val(lay["mi"][name]["mi_bits"]) for lay in lays])
        base = np.array([val(lay["mi"][name]["baseline_bits"]) for lay in lays])
        ax1.plot(x, mi, "o-", color=c, label=f"{name}")
        ax1.plot(x, base, "--", color=c, alpha=0.7, label=f"{name} shuffled baseline")
        ax2.bar(np.arange(len(x)) + (j - 1) * width, mi - base, width=width, color=c, label=name)
    ax1.set_xticks(x)
    ax1.tick_params(axis="x", labelsize=7)
    ax1.set_xlabel("layer")
    ax1.set_ylabel("MI with expert choice (bits)")
    ax1.set_title("Mutual information and independence baseline")
    ax1.legend(fontsize=7)
    ax2.set_xticks(np.arange(len(x)))
    ax2.set_xticklabels([str(v) for v in x], fontsize=7)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("excess MI (bits)")
    ax2.set_title("MI above baseline")
    ax2.legend(fontsize=7)
    fig.savefig(path, dpi=dpi)
    return path


def _entropy_plot(stats: dict[str, Any], path: Path, dpi: int) -> Path:
    from matplotlib import colormaps

    lays = stats["layers"]
    curves = np.array([[np.nan if v is None else v for v in lay["entropy_norm_by_step"]] for lay in lays],
                      dtype=np.float64)
    fig = _new_figure(7, 4)
    ax = fig.subplots()
    cmap = colormaps["viridis"]
    steps = np.arange(curves.shape[1])
    for i, (lay, row) in enumerate(zip(lays, curves)):
        ax.plot(steps, row, color=cmap(i / max(1, len(lays) - 1)), lw=0.8, alpha=0.8,
                label=f"layer {lay['layer']}" if len(lays) <= 12 else None)
    with np.errstate(invalid="ignore"):
        if np.isfinite(curves).any():
            ax.plot(steps, np.nanmean(curves, axis=0), color="k", lw=2, label="mean over layers")
    ax.axvline(curves.shape[1] / 2, color="gray", ls=":", lw=1)
    ax.set_xlabel("sampling step (0 = first, noisiest)")
    ax.set_ylabel("normalised entropy H / log E")
    ax.set_title("Uniformity of expert choice by step")
    ax.legend(fontsize=6, ncol=2)
    fig.savefig(path, dpi=dpi)
    return path


def make_figures(results: RoutingResults, stats: dict[str, Any], out_dir: str | Path,
                 branch: str | None = None, dpi: int = 100) -> list[Path]:
    """Write the routing figures as PNGs to out_dir and return their paths.

    heatmap_class.png, heatmap_position.png, heatmap_step.png: selection frequency per layer
    (rows: class / position / step, x axis: expert; each panel min-max normalised, as the paper);
    spatial_maps.png: each expert's selection probability on the patch grid, layers x experts;
    mi_by_layer.png: MI with class, position and step per layer, with shuffled baselines;
    entropy_by_step.png: per-step normalised entropy of the expert distribution.
    branch defaults to the branch the stats were computed on.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    branch = branch or stats.get("branch", "cond")
    tabs = branch_tables(results, branch)
    paths = [
        _heatmaps(tabs["class"], results.layers, "class", f"Expert selection by class ({branch})",
                  out / "heatmap_class.png", dpi),
        _heatmaps(tabs["position"], results.layers, "token position", f"Expert selection by position ({branch})",
                  out / "heatmap_position.png", dpi),
        _heatmaps(tabs["step"], results.layers, "sampling step", f"Expert selection by step ({branch})",
                  out / "heatmap_step.png", dpi),
        _spatial_maps(results, tabs["position"], out / "spatial_maps.png", dpi, branch, tabs["tokens"]),
        _mi_plot(stats, out / "mi_by_layer.png", dpi),
        _entropy_plot(stats, out / "entropy_by_step.png", dpi),
    ]
    return paths
