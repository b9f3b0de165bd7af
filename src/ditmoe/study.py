"""`ditmoe study`: dense against each router at matched activated compute, and the ablations that
matter, on embedded MNIST, with several training seeds per variant (issue #20).

Every variant trains with the recipe of `configs/mnist.yaml` (read at run time: model, lr,
warm-up, cosine decay, EMA, grad clip, sampler, steps and guidance follow the file) at one step
budget; the seed fixes the initialisation and the data order, so seed k of every variant sees the
same batches. Every model then samples the same labels (`samples_per_class` per digit) from the
same per-image noise with the recipe's sampler, and is scored by FID on the MNIST classifier's
features against the 10k MNIST test images and by class agreement. MoE variants also get a cheap
routing analysis (mutual information of the expert choice with position, sampling step and class).

    ditmoe study --out runs/study [--steps 1200] [--seeds 0,1,2] [--variants dense,topk_softmax]
                 [--samples-per-class 200] [--list]

Layout: OUT/<variant>/seed<k>/ (a training run folder), OUT/reference_stats.npz, OUT/study.json
(written atomically after each variant/seed), OUT/loss_curves.png, OUT/fid_vs_flops.png,
OUT/fid_vs_time.png and OUT/report.md (the tables and verdicts in Markdown, `ditmoe.study_report`).
A rerun with the same settings reuses every variant/seed that has an entry in study.json and its
weights (no training, no sampling); an interrupted training resumes from its last checkpoint (the
trainer's resume="auto").

study.json (schema 1):
    schema: 1
    settings: {recipe (path), train (the TrainConfig fields every run shares, steps included),
               model, model_overrides, data, samples_per_class, sampling {sampler, steps, cfg_scale},
               sample_seed, analysis {per_class, permutations}, seeds, variants}
    variants: {name: {note, overrides, matched (equal activated MACs asserted), macs_per_image,
               macs_per_token, macs_ratio (to the base MoE), activated_params, total_params,
               experts_per_token, train_flops (3 x 2 x MACs x steps x batch)}}
    runs: [{variant, seed, run, fid, class_agreement, precision, recall, final_loss (diffusion loss,
            last log window), steps, step_seconds (median over log windows of batch / images/s:
            training only), train_seconds (steps x step_seconds), train_wall_seconds (the trainer's
            own total, checkpoints included; None when the run was finished earlier), sample_seconds,
            eval_seconds, curve {step, loss}, routing (MoE only: {mi_excess_bits {position, step,
            class: mean over layers}, mi_excess_bits_by_layer, unrouted_fraction, findings {i, ii,
            iii: holds}}), finished_at (UTC ISO time)}]
    summary: {variant: {seeds, fid / class_agreement / final_loss / step_seconds / train_seconds:
              {n, mean, std, min, max}, routing {position/step/class mean excess bits over seeds}}}
    comparisons: the paired comparisons of each variant against its reference (routers and
              ablations against topk_softmax, every variant against dense), FID and agreement
    verdicts: {any_router_beats_dense, best_router, shared_expert_helps, more_experts_help,
               balance_loss_helps: {answer, comparisons}}
    rule: the comparison rule in words (ditmoe.study_stats)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .config import ROUTERS, ModelConfig

RECIPE_PATH = Path(__file__).resolve().parents[2] / "configs" / "mnist.yaml"
BASE_VARIANT = "topk_softmax"  # the recipe's MoE: 8 experts, top-2, shared expert, balance loss 0.01
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_SAMPLES_PER_CLASS = 200  # 2000 samples per model
SAMPLE_SEED = 1234  # the per-image noise every model samples from
ANALYSIS_PER_CLASS = 2  # routing analysis: 20 images, the recipe's sampler
ANALYSIS_PERMUTATIONS = 1
MACS_TOLERANCE = 0.01  # matched variants: activated MACs within 1% of the base MoE's
FINE_GRAINED_SPLIT = 4  # fine_grained: each expert split into 4, 4x the experts, 4x top_k
SCHEMA = 1

# The default step budget, sized so that the default study (11 variants x 3 seeds = 33 runs)
# fits about 2.5 hours on 2 cores. The quickstart's base model trains at ~450-650 images/s there
# (docs/recipe.md; take 450, the slow end, since some routers are slower than top-k):
#   training:  1200 steps x 64 images / 450 images/s               = 171 s per run
#   sampling:  2000 images x 26 network calls (Heun 13) x 2 (guidance doubles the batch)
#              = 104,000 image forwards; a forward is ~1/3 of a training step's work per image,
#              so ~1350 images/s                                    =  77 s per run
#   scoring, routing analysis (20 images), model set-up, checkpoints  ~ 15 s per run
#   per run ~260 s; 33 runs                                         = 8600 s = 2.4 hours
# (the full run took less; docs/experiments.md gives its time.)
# Dropping the four ablations (21 runs) would allow about 2400 steps in the same time.
DEFAULT_STEPS = 1200


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    matched: bool = True  # its activated MACs per token must equal the base MoE's (within 1%)


# ----------------------------------------------------------------------------- variants
def load_recipe(path: str | Path | None = None) -> dict[str, Any]:
    """The recipe file (configs/mnist.yaml) as a dict, its keys checked against TrainConfig."""
    from .config import TrainConfig, check_field_types, load_config_file

    p = Path(path) if path else RECIPE_PATH
    if not p.exists():
        raise FileNotFoundError(f"the study's recipe {p} does not exist; give --recipe PATH (configs/mnist.yaml "
                                "of the repository)")
    data = load_config_file(p)  # what `ditmoe train --config` reads: YAML or TOML
    if "model" not in data:
        raise ValueError(f"recipe {p} names no model; the study trains the recipe's model (e.g. `model: DiT-MoE-mnist`)")
    model_overrides = data.pop("model_overrides", {}) or {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"recipe {p}: unknown training option(s) {sorted(unknown)}")
    data = check_field_types(TrainConfig, data, f"recipe {p}")
    data["model_overrides"] = model_overrides
    return data


def base_config(model: str | None = None, model_overrides: dict[str, Any] | None = None,
                recipe: dict[str, Any] | None = None) -> ModelConfig:
    """The base MoE: the recipe's model with the recipe's and the caller's model overrides."""
    from .registry import get_config

    recipe = recipe if recipe is not None else load_recipe()
    return get_config(model or recipe["model"], **{**recipe.get("model_overrides", {}), **(model_overrides or {})})


def matched_dense_overrides(base: ModelConfig | None = None) -> dict[str, Any]:
    """A dense SwiGLU DiT whose per-token MLP MACs equal the MoE's routed top-k plus shared expert.

    MoE per token and block: k * 3 * D * H_e + 3 * D * H_s (+ the router's E * D, under 1%);
    a SwiGLU of width k * H_e + H_s does the same products.
    """
    cfg = base if base is not None else base_config()
    width = cfg.top_k * cfg.routed_hidden + cfg.shared_width
    return {"num_experts": 0, "dense_mlp_type": "swiglu", "mlp_ratio": width / cfg.hidden_size}


def all_variants(base: ModelConfig | None = None, check: bool = True) -> list[Variant]:
    """Every study variant, its overrides derived from `base` (the recipe's MoE), in run order:
    dense, the six routers, then the ablations (the first to drop when time is short). With
    `check`, raises AssertionError where a matched variant's activated MACs are off by > 1%."""
    b = base if base is not None else base_config()
    e, k, h, d = b.num_experts, b.top_k, b.routed_hidden, b.hidden_size
    m = FINE_GRAINED_SPLIT
    alpha = b.replace(router="topk_softmax").balance_alpha
    shape = f"{e} experts of width {h}, top-{k}, shared expert {b.shared_width}"
    out = [Variant("dense", matched_dense_overrides(b),
                   f"dense SwiGLU DiT, MLP width {k} x {h} + {b.shared_width} = {k * h + b.shared_width}: "
                   "the MoE's activated MACs without the router")]
    notes = {
        "topk_softmax": f"DiT-MoE: {shape}, softmax top-k, balance loss {alpha} (the recipe's model)",
        "topk_bias": "aux-loss-free bias (DeepSeek-V3), sigmoid scores, no balance loss",
        "expert_choice": "expert choice per image (EC-DiT), capacity factor 1: k tokens per expert on average",
        "token_pool": "batch-pool top-K with a capacity predictor (DiffMoE), capacity factor 1; MACs are training's",
        "prototype": "null-class tokens to one unconditional expert, others by cosine to prototypes (ProMoE)",
        "race": "global top-K over the batch (Expert Race); MACs are training's, inference uses a threshold",
    }
    for r in ROUTERS_IN_STUDY:
        out.append(Variant(r, {"router": r}, notes[r]))
    out += [
        Variant("no_shared", {"shared_hidden": 0}, "topk_softmax without the shared expert: fewer activated MACs",
                matched=False),
        Variant("e16", {"num_experts": 2 * e},
                f"{2 * e} experts of the same width {h}, top-{k}: the same activated MACs (only the router's "
                f"E x D grows), {2}x the routed parameters"),
        Variant("fine_grained", {"num_experts": m * e, "expert_hidden": h // m, "top_k": m * k},
                f"{m * e} experts of width {h // m}, top-{m * k}: each expert split in {m}, the same routed "
                "MACs and parameters (the router's E x D grows)"),
        Variant("alpha0", {"aux_alpha": 0.0}, "topk_softmax without the balance loss (alpha 0)"),
    ]
    if check:
        check_equal_compute(b, out)
    return out


ROUTERS_IN_STUDY = ("topk_softmax", "topk_bias", "expert_choice", "token_pool", "prototype", "race")
assert set(ROUTERS_IN_STUDY) == set(ROUTERS), "a router is missing from the study"


def variant_config(base: ModelConfig, v: Variant) -> ModelConfig:
    return base.replace(**v.overrides).validate()


def compute_stats(cfg: ModelConfig) -> dict[str, Any]:
    """Activated MACs (per image and per token; the accounting module's, which counts each
    router's mean experts per token) and parameters of one model config."""
    from .accounting import model_stats

    s = model_stats(cfg, image_size=cfg.input_size, vae_downsample=1)
    macs = s.gmacs * 1e9
    return {"macs_per_image": macs, "macs_per_token": macs / s.tokens, "activated_params": s.activated_params,
            "total_params": s.total_params, "experts_per_token": s.experts_per_token}


def check_equal_compute(base: ModelConfig, variants: list[Variant], tol: float = MACS_TOLERANCE) -> dict[str, float]:
    """{variant: activated MACs / the base MoE's}; raises AssertionError naming any matched
    variant off by more than `tol` (not an `assert`: it must hold under python -O too)."""
    ref = compute_stats(base)["macs_per_token"]
    ratios, bad = {}, []
    for v in variants:
        ratios[v.name] = compute_stats(variant_config(base, v))["macs_per_token"] / ref
        if v.matched and abs(ratios[v.name] - 1) > tol:
            bad.append(f"{v.name} ({ratios[v.name]:.4f})")
    if bad:
        raise AssertionError(f"activated MACs per token differ from the base MoE's by more than {tol:.0%}: "
                             f"{', '.join(bad)}")
    return ratios


def variant_table(base: ModelConfig, variants: list[Variant], steps: int, global_batch: int) -> dict[str, Any]:
    ref = compute_stats(base)["macs_per_token"]
    out = {}
    for v in variants:
        s = compute_stats(variant_config(base, v))
        out[v.name] = {"note": v.note, "overrides": v.overrides, "matched": v.matched, **s,
                       "macs_ratio": s["macs_per_token"] / ref,
                       "train_flops": train_flops(s["macs_per_image"], steps, global_batch)}
    return out


def train_flops(macs_per_image: float, steps: int, batch: int) -> float:
    """Training FLOPs: 2 FLOPs per MAC, forward + backward = 3 forwards."""
    return 3 * 2 * macs_per_image * steps * batch


# ----------------------------------------------------------------------------- arguments
def parse_seeds(spec: str | list[int] | tuple[int, ...]) -> list[int]:
    """"0,1,2" -> [0, 1, 2]; ValueError for anything but distinct integers >= 0."""
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
        try:
            seeds = [int(s) for s in items]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers (e.g. 0,1,2), got {spec!r}") from None
    else:
        seeds = list(spec)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"seeds must be integers, got {seeds!r}")
    if not seeds:
        raise ValueError("--seeds names no seed; give e.g. 0,1,2")
    if any(s < 0 or s >= 2**32 for s in seeds):
        raise ValueError(f"seeds must be in [0, 2^32), got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed: {seeds}")
    return seeds


def select_variants(spec: str | list[str] | None, variants: list[Variant]) -> list[Variant]:
    """The variants named by "a,b" (or a list; None / "all" = all), in the study's order;
    ValueError naming the unknown ones and the known ones."""
    if spec is None or spec == "all":
        return list(variants)
    wanted = [w.strip() for w in spec.split(",")] if isinstance(spec, str) else [str(w).strip() for w in spec]
    wanted = [w for w in wanted if w]
    if not wanted:
        raise ValueError("--variants names no variant")
    known = [v.name for v in variants]
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ValueError(f"unknown study variant(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [v for v in variants if v.name in wanted]


def check_budget(steps: int, samples_per_class: int) -> None:
    for name, value in (("--steps", steps), ("--samples-per-class", samples_per_class)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------- one run
def study_train_config(recipe: dict[str, Any], run: Path, steps: int, seed: int, data: str | None,
                       model: str, progress: bool):
    """The recipe's TrainConfig for one variant/seed: the step budget, the seed, resume="auto";
    the warm-up capped at a fifth of the steps, a log row at least every tenth of the steps, no
    preview grids (their sampling would count as training time), CSV logs only."""
    from .config import TrainConfig

    values = {k: v for k, v in recipe.items() if k != "model_overrides"}
    values.update(model=model, out=str(run), steps=steps, seed=seed, resume="auto", overwrite=False,
                  warmup_steps=min(values.get("warmup_steps", 0), steps // 5),
                  log_every=max(1, min(values.get("log_every", 50) or steps, steps // 10)),
                  ckpt_every=min(values.get("ckpt_every", 0) or steps, steps), keep_last=1,
                  sample_every=0, logger="csv", progress=progress)
    if data:
        values["data"] = data
    return TrainConfig(**values).validate()


def read_curve(run: Path) -> dict[str, list]:
    """Steps, diffusion loss and images/s of each log row of metrics.csv."""
    steps, losses, rates = [], [], []
    with open(run / "metrics.csv") as f:
        for row in csv.DictReader(f):
            steps.append(int(row["step"]))
            losses.append(float(row["diffusion"]))
            rates.append(float(row["images_per_s"]) if row.get("images_per_s") else None)
    return {"step": steps, "loss": losses, "images_per_s": rates}


def step_seconds(curve: dict[str, list], global_batch: int) -> float | None:
    """Median over the log windows of batch / images/s: the training time of one step, without
    checkpoints, sampling or evaluation (the median keeps a window slowed by another job out)."""
    rates = [r for r in curve["images_per_s"] if r]
    return global_batch / statistics.median(rates) if rates else None


def routing_findings(model, process: str, sampling: dict[str, Any], per_class: int = ANALYSIS_PER_CLASS,
                     permutations: int = ANALYSIS_PERMUTATIONS) -> dict[str, Any]:
    """The routing analysis of `ditmoe analyze` on a few images: mutual information (excess over
    the shuffled baseline, bits) of the expert choice with position, sampling step and class,
    per layer and averaged, and whether the paper's findings (i)-(iii) hold."""
    import torch

    from .analysis import RoutingRecorder, analyze_counts
    from .generate import generate

    cfg = model.config
    labels = torch.arange(cfg.num_classes).repeat_interleave(per_class)
    # Heun evaluates the model twice per step; its callback numbering covers both evaluations.
    num_steps = sampling["steps"] * 2 if sampling["sampler"] == "heun" else sampling["steps"]
    with RoutingRecorder(model, num_steps, cfg.num_classes) as rec:
        generate(model, process, labels, sampler=sampling["sampler"], steps=sampling["steps"],
                 cfg_scale=sampling["cfg_scale"], seed=SAMPLE_SEED, batch_size=len(labels), progress=False,
                 recorder=rec)
    stats = analyze_counts(rec.results(), permutations=permutations, include_tables=False)
    layers = stats["layers"]
    by_layer = {v: [lay["mi"][v]["excess_bits"] for lay in layers] for v in ("position", "step", "class")}
    mean = {v: (sum(x for x in xs if x is not None) / max(1, sum(x is not None for x in xs))) for v, xs in by_layer.items()}
    return {"mi_excess_bits": mean, "mi_excess_bits_by_layer": by_layer,
            "unrouted_fraction": [lay.get("unrouted_fraction") for lay in layers],
            "pairs_per_token": [lay.get("pairs_per_token") for lay in layers],
            "findings": {k: f.get("holds") for k, f in stats["findings"].items() if isinstance(f, dict)},
            "images": len(labels)}


def _reference_stats(out: Path, data: str, input_size: int) -> Path:
    import torch

    from .eval.evaluate import compute_reference_stats
    from .generate import to_uint8_nhwc

    ref = out / "reference_stats.npz"
    if ref.exists():
        return ref
    from .eval.mnist_classifier import ensure_mnist_classifier

    ensure_mnist_classifier()
    if data == "mnist":
        from .eval.reference import load_reference_images

        # the 10k MNIST test images, as the models train on them
        compute_reference_stats(load_reference_images("mnist", image_size=input_size), extractor="mnist", out=ref)
    else:  # the smoke test: real images of the same source as the training data
        from .data import build_dataset

        ds, _ = build_dataset(data, image_size=input_size)
        real = torch.stack([ds[i][0] for i in range(min(len(ds), 500))])
        compute_reference_stats(to_uint8_nhwc(real), extractor="mnist", out=ref)
    return ref


def train_run(cfg, overrides: dict[str, Any]) -> tuple[dict[str, Any], ModelConfig]:
    """Train (or resume, or find finished) one run; (the trainer's summary, the model config)."""
    from .train.loop import Trainer

    trainer = Trainer(cfg, overrides)
    return trainer.run(), trainer.model_cfg


def sample_and_score(run: Path, ref: Path, samples_per_class: int, sampling: dict[str, Any],
                     analyse: bool) -> dict[str, Any]:
    """Sample the study's labels from the study's noise, score them, and (MoE) analyse routing."""
    import torch

    from .eval.evaluate import evaluate
    from .generate import generate, load_for_sampling, to_uint8_nhwc

    loaded = load_for_sampling(run / "model_ema.safetensors")
    labels = torch.arange(loaded.model.config.num_classes).repeat_interleave(samples_per_class)
    t0 = time.perf_counter()
    images = to_uint8_nhwc(generate(loaded.model, loaded.process, labels, sampler=sampling["sampler"],
                                    steps=sampling["steps"], cfg_scale=sampling["cfg_scale"], seed=SAMPLE_SEED,
                                    batch_size=250, progress=False))
    t1 = time.perf_counter()
    metrics = evaluate(images, ref, extractor="mnist", labels=labels.numpy())
    t2 = time.perf_counter()
    routing = routing_findings(loaded.model, loaded.process, sampling) if analyse else None
    return {"fid": metrics["fid"], "class_agreement": metrics["class_agreement"], "precision": metrics["precision"],
            "recall": metrics["recall"], "sample_seconds": t1 - t0, "eval_seconds": t2 - t1, "routing": routing}


# ----------------------------------------------------------------------------- the study
def _comparable_settings(s: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in s.items() if k not in ("seeds", "variants")}


def analyse_study(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """summary, comparisons and verdicts of the run entries (ditmoe.study_stats)."""
    from . import study_stats as st

    summary = st.summarize_runs(runs)
    for name, s in summary.items():
        rs = [r for r in runs if r["variant"] == name and r.get("routing")]
        if rs:
            s["routing"] = {v: st.spread(r["routing"]["mi_excess_bits"][v] for r in rs)
                            for v in ("position", "step", "class")}
            s["routing"]["findings_holding"] = {
                k: sum(bool(r["routing"]["findings"].get(k)) for r in rs) for k in rs[0]["routing"]["findings"]}
    names = list(summary)
    comparisons = []
    for metric in ("fid", "class_agreement"):
        for n in names:
            if n != "dense" and "dense" in summary:
                comparisons.append(st.compare(runs, n, "dense", metric))
            if n not in ("dense", BASE_VARIANT) and BASE_VARIANT in summary:
                comparisons.append(st.compare(runs, n, BASE_VARIANT, metric))
    return {"summary": summary, "comparisons": comparisons,
            "verdicts": st.verdicts(runs, ROUTERS_IN_STUDY, dense="dense", base=BASE_VARIANT),
            "rule": st.COMPARISON_RULE}


def read_study(out: str | Path) -> dict[str, Any]:
    """OUT/study.json of a study folder, with a clear error when there is none or it is not one."""
    path = Path(out) / "study.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --out must name the folder of a study made by "
                                "`ditmoe study --out FOLDER`")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); it is not a study made by `ditmoe study`") from e
    required = {"settings", "variants", "runs", "summary"}
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not required <= set(doc):
        raise ValueError(f"{path} is not a study.json of schema {SCHEMA} (made by `ditmoe study`)")
    return doc


def run_study(out: str | Path, steps: int = DEFAULT_STEPS, seeds: str | list[int] = DEFAULT_SEEDS,
              variants: str | list[str] | None = None, samples_per_class: int = DEFAULT_SAMPLES_PER_CLASS,
              recipe: str | Path | None = None, data: str | None = None, model: str | None = None,
              model_overrides: dict[str, Any] | None = None, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the study; returns the study.json content. `data`, `model` and
    `model_overrides` replace the recipe's (the smoke test's tiny setting)."""
    from .config import TrainConfig
    from .study_report import write_report
    from .weights_io import atomic_write_json

    check_budget(steps, samples_per_class)
    seeds = parse_seeds(seeds if not isinstance(seeds, tuple) else list(seeds))
    rec = load_recipe(recipe)
    model = model or rec["model"]
    base = base_config(model, model_overrides, rec)
    chosen = select_variants(variants, all_variants(base))
    data = data or rec.get("data", "mnist")
    shared = study_train_config(rec, Path(out) / "_", steps, 0, data, model, progress)
    sampling = shared.sampling()
    train_settings = {k: v for k, v in shared.to_dict().items() if k not in ("out", "seed", "progress", "resume")}
    settings = {"recipe": str((Path(recipe) if recipe else RECIPE_PATH).resolve()), "train": train_settings,
                "model": model,
                "model_overrides": {**rec.get("model_overrides", {}), **(model_overrides or {})}, "data": data,
                "samples_per_class": samples_per_class, "sampling": sampling, "sample_seed": SAMPLE_SEED,
                "analysis": {"per_class": ANALYSIS_PER_CLASS, "permutations": ANALYSIS_PERMUTATIONS},
                "seeds": seeds, "variants": [v.name for v in chosen]}
    out = Path(out)
    path = out / "study.json"
    runs: list[dict[str, Any]] = []
    variant_info: dict[str, Any] = {}
    if path.exists():
        old = read_study(out)
        a, b = _comparable_settings(old.get("settings", {})), _comparable_settings(settings)
        diff = sorted(k for k in set(a) | set(b)
                      if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True))
        if diff:
            raise ValueError(f"{path} holds a study with other settings ({', '.join(diff)} differ); rerun with the "
                             "same settings to resume it, or give another --out")
        runs = old.get("runs", [])
        variant_info = old.get("variants", {})
        settings["seeds"] = sorted(set(old["settings"].get("seeds", [])) | set(seeds))
        settings["variants"] = list(dict.fromkeys(old["settings"].get("variants", []) + settings["variants"]))
    out.mkdir(parents=True, exist_ok=True)
    variant_info.update(variant_table(base, chosen, steps, shared.global_batch))

    def write() -> dict[str, Any]:
        doc = {"schema": SCHEMA, "settings": settings, "variants": variant_info, "runs": runs, **analyse_study(runs)}
        atomic_write_json(path, doc)
        write_report(doc, out)
        return doc

    doc = write()
    done = {(r["variant"], r["seed"]) for r in runs}
    ref = None
    total = len(chosen) * len(seeds)
    i = 0
    for v in chosen:
        for seed in seeds:
            i += 1
            run = out / v.name / f"seed{seed}"
            if (v.name, seed) in done and (run / "model_ema.safetensors").exists():
                log(f"[study] {i}/{total} {v.name} seed {seed}: finished earlier, reused")
                continue
            runs[:] = [r for r in runs if (r["variant"], r["seed"]) != (v.name, seed)]
            log(f"[study] {i}/{total} {v.name} seed {seed}: training {steps} steps ({v.note})")
            cfg = study_train_config(rec, run, steps, seed, data, model, progress)
            summary, model_cfg = train_run(cfg, {**settings["model_overrides"], **v.overrides})
            curve = read_curve(run)
            sec = step_seconds(curve, cfg.global_batch)
            if ref is None:
                ref = _reference_stats(out, data, model_cfg.input_size)
            scores = sample_and_score(run, ref, samples_per_class, sampling, model_cfg.is_moe)
            stats = compute_stats(model_cfg)
            wall = summary["seconds"] if summary.get("steps_this_run") == cfg.steps else None
            runs.append({"variant": v.name, "seed": seed, "run": str(run), **{k: scores[k] for k in
                         ("fid", "class_agreement", "precision", "recall")},
                         "final_loss": curve["loss"][-1] if curve["loss"] else None, "steps": summary["steps"],
                         "step_seconds": sec, "train_seconds": sec * steps if sec else None,
                         "train_wall_seconds": wall, "sample_seconds": scores["sample_seconds"],
                         "eval_seconds": scores["eval_seconds"], "activated_params": stats["activated_params"],
                         "macs_per_image": stats["macs_per_image"],
                         "train_flops": train_flops(stats["macs_per_image"], steps, cfg.global_batch),
                         "curve": {"step": curve["step"], "loss": curve["loss"]}, "routing": scores["routing"],
                         "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            doc = write()
            log(f"[study] {v.name} seed {seed}: FID {scores['fid']:.2f}, class agreement "
                f"{scores['class_agreement']:.3f}, {sec * 1000 if sec else float('nan'):.0f} ms per step, "
                f"sampling {scores['sample_seconds']:.0f} s")
    doc = write()
    make_study_figures(doc, out)
    for key, q in doc["verdicts"].items():
        log(f"[study] {key}: {q['answer']}")
    return doc


# ----------------------------------------------------------------------------- figures
def _mean_curve(rs: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    common = set(rs[0]["curve"]["step"])
    for r in rs[1:]:
        common &= set(r["curve"]["step"])
    steps = sorted(common)
    vals = [[dict(zip(r["curve"]["step"], r["curve"]["loss"]))[s] for r in rs] for s in steps]
    return steps, [sum(v) / len(v) for v in vals]


def make_study_figures(doc: dict[str, Any], out: str | Path) -> list[Path]:
    """loss_curves.png (mean over seeds per variant), fid_vs_flops.png and fid_vs_time.png
    (mean FID with min-max bars over seeds against training FLOPs / training wall time)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    runs, summary = doc["runs"], doc["summary"]
    paths: list[Path] = []
    if not runs:
        return paths
    names = list(summary)
    palette = colormaps["tab20"].colors  # 20 distinct colours: the default cycle repeats after 10 variants
    colors = {n: palette[i % len(palette)] for i, n in enumerate(names)}

    fig = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for n in names:
        rs = [r for r in runs if r["variant"] == n and r["curve"]["step"]]
        if rs:
            s, l = _mean_curve(rs)
            ax.plot(s, l, label=f"{n} ({len(rs)} seeds)", lw=1.2, color=colors[n],
                    ls="--" if n == "dense" else "-")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("diffusion loss (mean over seeds)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("training loss (each point: mean over a log window, then over seeds)")
    fig.tight_layout()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1], dpi=110)

    for key, fname, xlabel, scale in (("train_flops", "fid_vs_flops.png", "training compute (TFLOPs, activated)", 1e12),
                                      ("train_seconds", "fid_vs_time.png", "training wall time (minutes, this CPU)", 60)):
        fig = Figure(figsize=(6.5, 4.8))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for n in names:
            rs = [r for r in runs if r["variant"] == n and r.get("fid") is not None and r.get(key) is not None]
            if not rs:
                continue
            xs = [r[key] / scale for r in rs]
            fid = summary[n]["fid"]
            x = sum(xs) / len(xs)
            ax.errorbar([x], [fid["mean"]], yerr=[[fid["mean"] - fid["min"]], [fid["max"] - fid["mean"]]],
                        xerr=[[x - min(xs)], [max(xs) - x]], fmt="s" if n == "dense" else "o", color=colors[n],
                        capsize=3)
            ax.annotate(n, (x, fid["mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FID (mnist-cnn), lower is better")
        ax.set_title(f"FID (mean, min-max over seeds) against {xlabel.split(' (')[0]}")
        fig.tight_layout()
        paths.append(out / fname)
        fig.savefig(paths[-1], dpi=110)
    return paths


def list_variants(model: str | None = None, recipe: str | Path | None = None,
                  model_overrides: dict[str, Any] | None = None) -> str:
    """The `--list` table: name, activated MACs per token and against the base MoE, parameters, note."""
    rec = load_recipe(recipe)
    base = base_config(model, model_overrides, rec)
    vs = all_variants(base)
    table = variant_table(base, vs, 1, 1)
    lines = [f"{'variant':<14} {'MACs/token':>11} {'vs base':>8} {'activated':>10} {'total':>9}  note"]
    for v in vs:
        t = table[v.name]
        lines.append(f"{v.name:<14} {t['macs_per_token'] / 1e6:>9.3f} M {t['macs_ratio']:>8.4f} "
                     f"{t['activated_params'] / 1e6:>8.2f} M {t['total_params'] / 1e6:>7.2f} M  {v.note}")
    return "\n".join(lines)
