"""One self-contained HTML page for a training run: `ditmoe report RUN_DIR`.

The page is made from what a run folder already holds (see README's table for the quickstart):

    config.json            model and training settings            -> configuration tables
    train_summary.json     steps, time, images/s, parameters      -> the summary line at the top
    metrics.csv            one row per log step                   -> loss / balance / throughput curves
    expert_load.csv        step, layer, expert_0 .. expert_{E-1}  -> expert load over training
    previews/*.png         grids sampled during training          -> previews, sorted by step
    samples/grid.png       the final sample grid                  -> final samples
    eval.json              FID etc. of the samples                -> evaluation table, with the
    eval_real_floor.json   the same metrics for real images          real-data floor as a second row
    analysis/stats.json    routing findings (`ditmoe analyze`)    -> findings and the figures beside it

Each section appears only when its files do; unreadable or half-written files are skipped with a
note at the bottom of the page. Every image is embedded as a base64 data URI and the charts are
drawn with matplotlib (Agg canvas, object API: no global backend is changed), so the page needs
nothing but itself: no network, scripts, fonts or stylesheets from elsewhere. Importing this
module does not import torch.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

RUN_FOLDER_HELP = ("a run folder is what `ditmoe train --out DIR` writes: config.json (model and training "
                   "settings) and metrics.csv (one row per log step), and usually expert_load.csv, "
                   "train_summary.json, model_ema.safetensors and checkpoints/; the quickstart adds "
                   "samples/, eval.json and analysis/")

# Fields shown in the compact configuration tables (the rest are under "all settings").
_MODEL_KEYS = ("name", "input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
               "num_experts", "top_k", "norm_topk", "expert_hidden", "shared_hidden", "expert_type",
               "moe_placement", "aux_alpha", "num_classes", "timestep_scale")
_TRAIN_KEYS = ("data", "process", "steps", "global_batch", "micro_batch", "lr", "warmup_steps", "weight_decay",
               "grad_clip", "ema_decay", "precision", "parallel", "seed", "log_every", "ckpt_every")

# Curves of metrics.csv: (panel title, columns drawn in it, y label).
_PANELS = (
    ("loss", ("loss", "diffusion", "mse"), "loss"),
    ("balance loss (Eq. 5, summed over MoE layers)", ("balance",), "balance loss"),
    ("throughput", ("images_per_s",), "images / s"),
    ("expert load CV (mean over layers)", ("expert_load_cv",), "CV (0 = balanced)"),
    ("gradient norm", ("grad_norm",), "global grad norm"),
    ("learning rate", ("lr",), "lr"),
)

_LEGEND = {"loss": "total (diffusion + balance)", "diffusion": "diffusion"}

_EVAL_COLUMNS = (("fid", "FID"), ("sfid", "sFID"), ("inception_score", "IS"), ("precision", "precision"),
                 ("recall", "recall"), ("class_agreement", "class agreement"))

_FINDING_TITLES = {
    "i": "(i) expert choice depends on spatial position and time step, hardly on class",
    "ii": "(ii) deeper layers move from position-specific to dispersed, balanced choice",
    "iii": "(iii) choice is concentrated at early, high-noise steps and uniform after about half of them",
}
_ANALYSIS_FIGURE_ORDER = ("heatmap_class", "heatmap_position", "heatmap_step", "spatial_maps",
                          "mi_by_layer", "entropy_by_step")
_MAX_PREVIEWS = 12
_IMAGE_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp"}


# ----------------------------------------------------------------------------- checks
def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """The run folder as a Path, or a clear error if it is not one."""
    run = Path(run_dir)
    if not run.exists():
        raise FileNotFoundError(f"{run} does not exist; {RUN_FOLDER_HELP}")
    if not run.is_dir():
        raise ValueError(f"{run} is not a folder; {RUN_FOLDER_HELP}")
    if not (run / "config.json").is_file() and not (run / "metrics.csv").is_file():
        raise ValueError(f"{run} is not a training run: it has neither config.json nor metrics.csv; {RUN_FOLDER_HELP}")
    return run


# ---------------------------------------------------------------------------- reading
class _Notes:
    """What could not be read, told at the bottom of the page instead of failing."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, text: str) -> None:
        self.items.append(text)


def _read_json(path: Path, notes: _Notes) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        notes.add(f"{path.name}: not readable as JSON ({e.__class__.__name__}); skipped")
        return None


def _to_float(s: str) -> float:
    """A CSV cell as a float; empty or non-numeric cells (a column this report cannot draw) are NaN."""
    try:
        return float(s)
    except ValueError:
        return math.nan


def read_metrics(path: Path, notes: _Notes | None = None) -> dict[str, np.ndarray]:
    """metrics.csv as {column: values} sorted by step; rows that do not parse (a half-written last
    line) are skipped, and a step logged twice (a resumed run re-logs steps after its checkpoint)
    keeps its last row. Empty dict when there is no complete row."""
    notes = notes or _Notes()
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        notes.add(f"{path.name}: not readable ({e.__class__.__name__}); skipped")
        return {}
    if not rows or "step" not in rows[0]:
        if rows:
            notes.add(f"{path.name}: no 'step' column in the header; skipped")
        return {}
    header = [h.strip() for h in rows[0]]
    by_step: dict[float, list[float]] = {}
    bad = 0
    for row in rows[1:]:
        if row == [] or row == header:
            continue
        if len(row) != len(header):
            bad += 1
            continue
        values = [_to_float(v) for v in row]
        step = values[header.index("step")]
        if math.isnan(step):
            bad += 1
            continue
        by_step[step] = values
    if bad:
        notes.add(f"{path.name}: {bad} incomplete or malformed row(s) skipped")
    if not by_step:
        return {}
    table = np.array([by_step[s] for s in sorted(by_step)], dtype=np.float64)
    return {h: table[:, i] for i, h in enumerate(header)}


def read_expert_load(path: Path, notes: _Notes | None = None) -> tuple[np.ndarray, list[int], np.ndarray] | None:
    """expert_load.csv (step, layer, expert_0 ..) as (steps (S,), layer ids (L,), loads (S, L, E));
    a (step, layer) missing from the file is NaN. None when there is no complete row."""
    notes = notes or _Notes()
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        notes.add(f"{path.name}: not readable ({e.__class__.__name__}); skipped")
        return None
    if not rows or rows[0][:2] != ["step", "layer"] or len(rows[0]) < 3:
        if rows:
            notes.add(f"{path.name}: header is not 'step,layer,expert_0,..'; skipped")
        return None
    n_experts = len(rows[0]) - 2
    cells: dict[tuple[int, int], list[float]] = {}
    bad = 0
    for row in rows[1:]:
        if not row:
            continue
        if len(row) != n_experts + 2:
            bad += 1
            continue
        try:
            step, layer = int(float(row[0])), int(float(row[1]))
            cells[(step, layer)] = [float(v) for v in row[2:]]
        except ValueError:
            bad += 1
    if bad:
        notes.add(f"{path.name}: {bad} incomplete or malformed row(s) skipped")
    if not cells:
        return None
    steps = sorted({s for s, _ in cells})
    layers = sorted({lay for _, lay in cells})
    loads = np.full((len(steps), len(layers), n_experts), np.nan)
    s_index = {s: i for i, s in enumerate(steps)}
    l_index = {lay: i for i, lay in enumerate(layers)}
    for (s, lay), v in cells.items():
        loads[s_index[s], l_index[lay]] = v
    return np.array(steps, dtype=np.float64), layers, loads


def _step_of(path: Path) -> int | None:
    numbers = re.findall(r"\d+", path.stem)
    return int(numbers[-1]) if numbers else None


def find_previews(run: Path) -> list[tuple[int | None, Path]]:
    """Images under previews/ as (step, path), sorted by the step number in their name."""
    folder = run / "previews"
    if not folder.is_dir():
        return []
    found = [(_step_of(p), p) for p in folder.iterdir() if p.suffix.lower() in _IMAGE_MIME and p.is_file()]
    return sorted(found, key=lambda sp: (sp[0] is None, sp[0] or 0, sp[1].name))


# ------------------------------------------------------------------------- embedding
def _data_uri(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    mime = _IMAGE_MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig


def _figure_uri(fig, dpi: int = 100) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _style_axis(ax) -> None:
    ax.grid(True, alpha=0.3, linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8)


# ---------------------------------------------------------------------------- charts
def _finite(a: np.ndarray) -> bool:
    return bool(np.isfinite(a).any())


def _curve_panels(metrics: dict[str, np.ndarray]) -> list[tuple[str, list[str], str]]:
    """The panels worth drawing: known groups first (a column identical to one already drawn, such
    as mse equal to the diffusion loss of a flow model, is left out), then other numeric columns."""
    panels, used = [], {"step"}
    for title, cols, ylabel in _PANELS:
        drawn: list[str] = []
        for c in cols:
            if c not in metrics or not _finite(metrics[c]):
                continue
            if any(np.allclose(metrics[c], metrics[d], equal_nan=True) for d in drawn):
                used.add(c)
                continue
            drawn.append(c)
        used.update(cols)
        if drawn:
            panels.append((title, drawn, ylabel))
    for c in metrics:
        if c not in used and _finite(metrics[c]):
            panels.append((c, [c], c))
    return panels[:9]


def training_curves_uri(metrics: dict[str, np.ndarray]) -> str | None:
    """Loss, balance loss, throughput and the other metrics.csv columns against step, one panel each."""
    panels = _curve_panels(metrics)
    if not panels:
        return None
    steps = metrics["step"]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(3.7 * ncols, 2.7 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = ("#1f5fa8", "#d9822b", "#3a9a5b")
    for ax, (title, cols, ylabel) in zip(axes.flat, panels):
        for c, color in zip(cols, colors):
            y = metrics[c]
            ax.plot(steps, y, color=color, linewidth=1.4, label=_LEGEND.get(c, c), marker="o" if len(steps) < 3 else None,
                    markersize=3)
        positive = np.concatenate([metrics[c][np.isfinite(metrics[c])] for c in cols])
        if len(positive) and positive.min() > 0 and positive.max() / positive.min() > 30:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        if len(cols) > 1:
            ax.legend(fontsize=7, frameon=False)
        _style_axis(ax)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return _figure_uri(fig)


def _load_cv(loads: np.ndarray) -> np.ndarray:
    """Coefficient of variation of the per-expert load along the last axis (0 = balanced)."""
    mean = loads.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, loads.std(axis=-1) / mean, np.nan)


def expert_load_uri(steps: np.ndarray, layers: Sequence[int], loads: np.ndarray) -> tuple[str, dict[str, Any]]:
    """Per-layer load CV over training (left) and the last logged load, layers x experts, as a
    multiple of the uniform share 1/E (right). Returns the figure and a few numbers for the text."""
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm

    n_layers, n_experts = loads.shape[1], loads.shape[2]
    cv = _load_cv(loads)  # (S, L)
    last = next((i for i in range(len(steps) - 1, -1, -1) if np.isfinite(loads[i]).all()), len(steps) - 1)
    final = loads[last] * n_experts  # 1 = the uniform share
    fig = _new_figure(11.0, max(3.2, 0.36 * n_layers + 1.6))
    ax_cv, ax_map = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1.0]})

    cmap = colormaps["viridis"]
    for j, lay in enumerate(layers):
        color = cmap(j / max(1, n_layers - 1))
        label = f"block {lay}" if n_layers <= 8 or j in (0, n_layers - 1) else None  # a short legend
        ax_cv.plot(steps, cv[:, j], color=color, linewidth=1.0, alpha=0.9, label=label,
                   marker="o" if len(steps) < 3 else None, markersize=3)
    with np.errstate(all="ignore"):
        mean_cv = np.nanmean(np.where(np.isfinite(cv), cv, np.nan), axis=1)
    ax_cv.plot(steps, mean_cv, color="black", linewidth=2.0, label="mean")
    ax_cv.set_title("load imbalance per MoE layer over training", fontsize=10)
    ax_cv.set_xlabel("step", fontsize=8)
    ax_cv.set_ylabel("CV of expert load (0 = balanced)", fontsize=8)
    ax_cv.set_ylim(bottom=0)
    ax_cv.legend(fontsize=7, frameon=False, loc="upper right")
    _style_axis(ax_cv)

    finite = final[np.isfinite(final)]
    hi = max(2.0, float(finite.max()) if len(finite) else 2.0)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=hi)
    im = ax_map.imshow(final, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    ax_map.set_title(f"expert load at step {int(steps[last])} (x uniform share 1/{n_experts})", fontsize=10)
    ax_map.set_xlabel("expert", fontsize=8)
    ax_map.set_ylabel("MoE block", fontsize=8)
    if n_experts <= 32:
        ax_map.set_xticks(range(n_experts))
    ax_map.set_yticks(range(n_layers))
    ax_map.set_yticklabels([str(lay) for lay in layers])
    ax_map.tick_params(labelsize=8)
    if n_experts <= 16 and n_layers <= 24:
        for (r, c), v in np.ndenumerate(final):
            if np.isfinite(v):
                ax_map.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(v - 1.0) > 0.6 * (hi - 1.0) or v < 0.35 else "black")
    fig.colorbar(im, ax=ax_map, shrink=0.9).ax.tick_params(labelsize=7)
    facts = {"step": int(steps[last]), "first_step": int(steps[0]), "experts": n_experts, "layers": n_layers,
             "cv_first": float(mean_cv[0]) if np.isfinite(mean_cv[0]) else None,
             "cv_last": float(mean_cv[last]) if np.isfinite(mean_cv[last]) else None,
             "max_share": float(np.nanmax(final)) if len(finite) else None,
             "min_share": float(np.nanmin(final)) if len(finite) else None}
    return _figure_uri(fig), facts


# ------------------------------------------------------------------------------ html
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3g}"
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _kv_table(items: Iterable[tuple[str, Any]]) -> str:
    """Settings as a compact grid of name / value cells (several per row on a wide page)."""
    cells = "".join(f'<div><span>{_e(k)}</span><code>{_e(_fmt(v))}</code></div>' for k, v in items)
    return f'<div class="kv">{cells}</div>'


def _img(uri: str, alt: str, cls: str = "") -> str:
    return f'<img src="{uri}" alt="{_e(alt)}"' + (f' class="{cls}"' if cls else "") + ">"


def _section(anchor: str, title: str, body: str) -> tuple[str, str, str]:
    return anchor, title, f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _config_section(config: Any) -> tuple[str, str, str] | None:
    if not isinstance(config, dict) or not config:
        return None
    model = config.get("model") if isinstance(config.get("model"), dict) else None
    train = config.get("train") if isinstance(config.get("train"), dict) else None
    if model is None and train is None:  # some other layout: show it flat
        return _section("config", "Configuration", _kv_table(sorted(config.items())))
    blocks, everything = [], []
    for title, d, keys in (("model", model, _MODEL_KEYS), ("training", train, _TRAIN_KEYS)):
        if not d:
            continue
        shown = [(k, d[k]) for k in keys if k in d]
        blocks.append(f"<h3>{title}</h3>{_kv_table(shown)}")
        everything.append(f"<h3>{title}</h3>{_kv_table(sorted(d.items()))}")
    body = f'{"".join(blocks)}<details><summary>all settings</summary>{"".join(everything)}</details>'
    return _section("config", "Configuration", body)


def _curves_section(metrics: dict[str, np.ndarray]) -> tuple[str, str, str] | None:
    if not metrics:
        return None
    uri = training_curves_uri(metrics)
    if uri is None:
        return None
    steps = metrics["step"]
    text = (f"<p>{len(steps)} log rows from metrics.csv, steps {int(steps[0])} to {int(steps[-1])}; the loss "
            "terms of each row are means over the steps since the previous row.</p>")
    return _section("curves", "Training curves", text + _img(uri, "training curves", "chart"))


def _load_section(run: Path, notes: _Notes) -> tuple[str, str, str] | None:
    path = run / "expert_load.csv"
    if not path.is_file():
        return None
    parsed = read_expert_load(path, notes)
    if parsed is None:
        return None
    uri, facts = expert_load_uri(*parsed)
    parts = [f"{facts['layers']} MoE layer(s), {facts['experts']} experts; the fraction of routed tokens "
             "each expert received over each log interval (expert_load.csv)."]
    if facts["cv_first"] is not None and facts["cv_last"] is not None:
        parts.append(f"Mean load CV went from {facts['cv_first']:.3f} at step {facts['first_step']} to "
                     f"{facts['cv_last']:.3f} at step {facts['step']}.")
    if facts["max_share"] is not None:
        parts.append(f"At step {facts['step']} the busiest expert took {facts['max_share']:.2f}x and the idlest "
                     f"{facts['min_share']:.2f}x the uniform share (red: more than uniform, blue: less).")
    return _section("load", "Expert load", f"<p>{_e(' '.join(parts))}</p>" + _img(uri, "expert load", "chart"))


def _previews_section(run: Path) -> tuple[str, str, str] | None:
    previews = find_previews(run)
    if not previews:
        return None
    chosen = previews
    if len(previews) > _MAX_PREVIEWS:
        idx = np.unique(np.linspace(0, len(previews) - 1, _MAX_PREVIEWS).round().astype(int))
        chosen = [previews[i] for i in idx]
    cards = []
    for step, path in chosen:
        uri = _data_uri(path)
        if uri is None:
            continue
        caption = f"step {step:,}" if step is not None else path.name
        cards.append(f'<figure>{_img(uri, caption, "pix")}<figcaption>{_e(caption)}</figcaption></figure>')
    if not cards:
        return None
    note = (f"<p>{len(chosen)} of the {len(previews)} grids in previews/, evenly spaced.</p>"
            if len(chosen) < len(previews) else f"<p>Grids sampled during training (previews/).</p>")
    return _section("previews", "Samples during training", note + f'<div class="gallery">{"".join(cards)}</div>')


def _samples_section(run: Path, notes: _Notes) -> tuple[str, str, str] | None:
    grid = run / "samples" / "grid.png"
    if not grid.is_file():
        return None
    uri = _data_uri(grid)
    if uri is None:
        return None
    cfg = _read_json(run / "samples" / "sample_config.json", notes)
    text = "samples/grid.png"
    if isinstance(cfg, dict):
        bits = []
        if cfg.get("sampler"):
            bits.append(f"{cfg['sampler']} sampler")
        if cfg.get("steps"):
            bits.append(f"{cfg['steps']} steps")
        if cfg.get("cfg_scale") is not None:
            bits.append(f"guidance scale {cfg['cfg_scale']}")
        if cfg.get("weights"):
            bits.append(f"{cfg['weights']} weights")
        if cfg.get("num_images"):
            bits.insert(0, f"{cfg['num_images']} images")
        if bits:
            text += ": " + ", ".join(bits)
    body = f'<figure class="grid">{_img(uri, "final sample grid", "pix big")}<figcaption>{_e(text)}</figcaption></figure>'
    return _section("samples", "Final samples", body)


def _eval_rows(run: Path, notes: _Notes) -> list[tuple[str, dict[str, Any]]]:
    rows: list[tuple[str, dict[str, Any]]] = []
    main = _read_json(run / "eval.json", notes)
    if isinstance(main, dict):
        if any(k in main for k, _ in _EVAL_COLUMNS):
            rows.append(("samples of this model", main))
        for key, sub in main.items():  # a nested layout: {"samples": {...}, "real_floor": {...}}
            if isinstance(sub, dict) and any(k in sub for k, _ in _EVAL_COLUMNS):
                label = "real data (the floor)" if "real" in key or "floor" in key else key
                rows.append((label, sub))
    floor = _read_json(run / "eval_real_floor.json", notes)
    if isinstance(floor, dict) and any(k in floor for k, _ in _EVAL_COLUMNS):
        rows.append((f"{_fmt(floor.get('num_samples'))} real training images (the floor at this sample count)"
                     if floor.get("num_samples") else "real images (the floor)", floor))
    return rows


def _metric(key: str, v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
        return "–"
    return f"{v:.1f}" if key in ("fid", "sfid") else f"{v:.2f}" if key == "inception_score" else f"{v:.3f}"


def _eval_section(run: Path, notes: _Notes) -> tuple[str, str, str] | None:
    rows = _eval_rows(run, notes)
    if not rows:
        return None
    cols = [(k, label) for k, label in _EVAL_COLUMNS if any(isinstance(r.get(k), (int, float)) for _, r in rows)]
    head = "<tr><th>images</th>" + "".join(f'<th class="num">{_e(label)}</th>' for _, label in cols) + \
        '<th class="num">count</th><th>features</th></tr>'
    body_rows = []
    for label, r in rows:
        cells = "".join(f'<td class="num">{_e(_metric(k, r.get(k)))}</td>' for k, _ in cols)
        body_rows.append(f"<tr><th>{_e(label)}</th>{cells}<td class=\"num\">{_e(_fmt(r.get('num_samples')))}</td>"
                         f"<td>{_e(r.get('extractor', '–'))}</td></tr>")
    ref = next((r.get("num_ref") for _, r in rows if r.get("num_ref")), None)
    text = ("<p>Lower FID is better; precision, recall and class agreement are better higher. "
            + (f"Reference set: {_e(_fmt(ref))} images. " if ref else "")
            + "The real-data row, when present, is what real images score at the same sample count: the best "
              "this evaluation can report. FID on a small classifier's features is not comparable with "
              "Inception FID.</p>")
    return _section("eval", "Evaluation", text + f'<table class="grid-table">{head}{"".join(body_rows)}</table>')


def _finding_values(values: Any, limit: int = 10) -> str:
    flat: list[tuple[str, Any]] = []
    if isinstance(values, dict):
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                flat.append((k, v))
            elif isinstance(v, dict):
                flat += [(f"{k}.{k2}", v2) for k2, v2 in v.items()
                         if isinstance(v2, (int, float)) and not isinstance(v2, bool)]
    if not flat:
        return ""
    shown = ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in flat[:limit])
    return f'<p class="values">{_e(shown)}{" …" if len(flat) > limit else ""}</p>'


def _analysis_section(run: Path, notes: _Notes) -> tuple[str, str, str] | None:
    folder = run / "analysis"
    if not folder.is_dir():
        return None
    stats = _read_json(folder / "stats.json", notes)
    figures = sorted((p for p in folder.glob("*.png") if p.is_file()),
                     key=lambda p: (_ANALYSIS_FIGURE_ORDER.index(p.stem) if p.stem in _ANALYSIS_FIGURE_ORDER
                                    else len(_ANALYSIS_FIGURE_ORDER), p.name))
    findings = stats.get("findings") if isinstance(stats, dict) else None
    if not isinstance(findings, dict):
        findings = {}
    if not findings and not figures:
        return None
    parts = []
    if isinstance(stats, dict) and "num_layers" in stats:
        setup = stats.get("setup") if isinstance(stats.get("setup"), dict) else {}
        line = (f"{stats.get('num_layers')} MoE layers, {stats.get('num_experts')} experts, top-{stats.get('top_k')}, "
                f"{stats.get('num_classes')} classes, {stats.get('num_steps')} sampling steps")
        if setup.get("per_class"):
            line += f", {setup['per_class']} images per class"
        if setup.get("sampler"):
            line += f" ({setup['sampler']}, guidance {setup.get('cfg_scale')})"
        parts.append(f"<p>Routing recorded while sampling: {_e(line)}. Full numbers in analysis/report.md.</p>")
    for key, f in findings.items():
        if not isinstance(f, dict):
            continue
        holds = f.get("holds")
        verdict, cls = {True: ("holds", "yes"), False: ("does not hold", "no")}.get(holds, ("not testable", "na"))
        title = _FINDING_TITLES.get(key, key)
        rule = f"<p class=\"rule\">Rule: {_e(f['rule'])}</p>" if f.get("rule") else ""
        parts.append(f'<div class="finding"><h3><span class="badge {cls}">{_e(verdict)}</span> {_e(title)}</h3>'
                     f"{rule}{_finding_values(f.get('values'))}</div>")
    cards = []
    for p in figures:
        uri = _data_uri(p)
        if uri is not None:
            cards.append(f'<figure>{_img(uri, p.stem, "chart")}<figcaption>{_e(p.name)}</figcaption></figure>')
    if cards:
        parts.append(f'<div class="figures">{"".join(cards)}</div>')
    return _section("analysis", "Routing analysis", "".join(parts))


def _summary_line(run: Path, config: Any, summary: Any, metrics: dict[str, np.ndarray]) -> str:
    facts: list[tuple[str, str]] = []
    model = config.get("model", {}) if isinstance(config, dict) else {}
    train = config.get("train", {}) if isinstance(config, dict) else {}
    summary = summary if isinstance(summary, dict) else {}
    name = summary.get("model") or (model.get("name") if isinstance(model, dict) else None)
    if name:
        facts.append(("model", str(name)))
    if summary.get("parameters"):
        facts.append(("parameters", f"{summary['parameters'] / 1e6:.2f}M"))
    if isinstance(train, dict) and train.get("process"):
        facts.append(("process", str(train["process"])))
    steps_done = summary.get("steps") or (int(metrics["step"][-1]) if metrics else None)
    if steps_done is not None:
        total = train.get("steps") if isinstance(train, dict) else None
        facts.append(("steps", f"{steps_done:,}" + (f" of {total:,}" if total and total != steps_done else "")))
    if summary.get("seconds"):
        resumed = summary.get("steps_this_run") not in (None, summary.get("steps"))
        facts.append(("time of last session" if resumed else "time", f"{summary['seconds'] / 60:.1f} min"))
    if metrics and "loss" in metrics and _finite(metrics["loss"]):
        facts.append(("final loss", f"{metrics['loss'][np.isfinite(metrics['loss'])][-1]:.4f}"))
    ips = summary.get("images_per_s")
    if ips:
        facts.append(("images/s", f"{ips:.0f}" + (f" ({summary['precision']})" if summary.get("precision") else "")))
    ev = _read_json(run / "eval.json", _Notes())
    if isinstance(ev, dict) and isinstance(ev.get("fid"), (int, float)):
        facts.append(("FID", f"{ev['fid']:.1f}" + (f" ({ev['extractor']})" if ev.get("extractor") else "")))
    return "".join(f'<div class="fact"><span>{_e(k)}</span><b>{_e(v)}</b></div>' for k, v in facts)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;
color:#1d2330;line-height:1.45}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px}
header h1{margin:0 0 2px;font-size:26px} header .sub{color:#5b6475;font-size:13px;margin-bottom:14px}
.facts{display:flex;flex-wrap:wrap;gap:8px;margin:10px 0 8px}
.fact{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:5px 11px}
.fact span{display:block;font-size:11px;color:#6b7385;text-transform:uppercase;letter-spacing:.04em}
.fact b{font-size:16px}
nav{font-size:13px;margin:8px 0 4px} nav a{color:#1f5fa8;margin-right:14px;text-decoration:none}
section{background:#fff;border:1px solid #dde1e8;border-radius:10px;padding:14px 20px 18px;margin:18px 0}
h2{font-size:19px;margin:2px 0 10px;border-bottom:1px solid #eceff3;padding-bottom:6px}
h3{font-size:14px;margin:10px 0 6px}
p{margin:6px 0 10px;font-size:14px}
img{max-width:100%;height:auto;display:block}
img.pix{image-rendering:pixelated;border:1px solid #dde1e8;background:#000}
img.big{width:min(100%,440px)}
.kv{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:0 18px;font-size:13px}
.kv>div{display:flex;justify-content:space-between;gap:8px;border-bottom:1px solid #f0f2f5;padding:3px 0}
.kv span{color:#5b6475} .kv code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
text-align:right;overflow-wrap:anywhere}
table{border-collapse:collapse;font-size:13px}
.grid-table th,.grid-table td{border-bottom:1px solid #e3e6eb;padding:5px 12px;text-align:left}
.grid-table .num{text-align:right;font-variant-numeric:tabular-nums}
.grid-table tr:first-child th{background:#f4f5f7}
details{margin-top:10px;font-size:13px} summary{cursor:pointer;color:#1f5fa8}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(140px,180px));gap:12px}
.gallery img{width:100%}
figure{margin:0} figcaption{font-size:12px;color:#5b6475;margin-top:4px}
.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:16px;margin-top:12px}
.finding{border-left:3px solid #dde1e8;padding:2px 0 2px 12px;margin:10px 0}
.finding h3{margin:2px 0 4px;font-weight:600}
.rule,.values{font-size:12.5px;color:#4a5263;margin:2px 0}
.badge{display:inline-block;font-size:11px;border-radius:10px;padding:1px 8px;margin-right:6px;
text-transform:uppercase;letter-spacing:.03em;vertical-align:1px}
.badge.yes{background:#dcf2e3;color:#1d6b36} .badge.no{background:#fbe3e1;color:#9b2c22}
.badge.na{background:#eceff3;color:#5b6475}
footer{font-size:12px;color:#6b7385;margin-top:22px}
"""


def render_run_report(run_dir: str | os.PathLike) -> str:
    """The HTML text of the report of the run in run_dir."""
    from . import __version__

    run = check_run_dir(run_dir)
    notes = _Notes()
    config = _read_json(run / "config.json", notes)
    summary = _read_json(run / "train_summary.json", notes)
    metrics = read_metrics(run / "metrics.csv", notes) if (run / "metrics.csv").is_file() else {}
    sections = [s for s in (
        _config_section(config),
        _samples_section(run, notes),  # results first, then how training went
        _eval_section(run, notes),
        _curves_section(metrics),
        _load_section(run, notes),
        _previews_section(run),
        _analysis_section(run, notes),
    ) if s is not None]
    title = f"Run report: {run.resolve().name}"
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in sections)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    note_html = ("<p>Skipped: " + "; ".join(_e(n) for n in notes.items) + ".</p>") if notes.items else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<header><h1>{_e(title)}</h1><div class=\"sub\">{_e(str(run.resolve()))} · made {_e(stamp)} by "
        f"ditmoe {_e(__version__)}</div><div class=\"facts\">{_summary_line(run, config, summary, metrics)}</div>"
        f"<nav>{nav}</nav></header>"
        + "".join(body for _, _, body in sections)
        + f"<footer>{note_html}<p>Everything on this page is embedded; it needs no network.</p></footer>"
        "</main></body></html>\n"
    )


def write_run_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the report of the run in run_dir to out (default RUN_DIR/report.html); return its path."""
    run = check_run_dir(run_dir)
    text = render_run_report(run)
    path = Path(out) if out is not None else run / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
