"""The small-scale replication study: dense against MoE at matched activated compute, and the
paper's ablations (shared expert, balance-loss weight, 8 against 16 experts), on embedded MNIST.

Every variant trains with the same step budget, batch, learning rate and data order (the data
order is a function of the seed only), then samples the same labels from the same per-image noise
and is scored by FID on the MNIST classifier's features and by class agreement.

    ditmoe study --out runs/study [--steps 2200] [--variants dense_seed0,moe_seed0] [--samples-per-class 20]

writes one run folder per variant, study.json, loss_curves.png and fid_vs_flops.png.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASE_MODEL = "DiT-MoE-mnist"


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    note: str = ""


def matched_dense_overrides() -> dict[str, Any]:
    """A dense SwiGLU DiT whose per-token MLP MACs equal the MoE's routed top-k plus shared expert.

    MoE per token and block: k * 3 * D * H_e + 3 * D * H_s (+ the router's E * D, under 1%);
    a SwiGLU of width k * H_e + H_s does the same products.
    """
    from .registry import get_config

    cfg = get_config(BASE_MODEL)
    width = cfg.top_k * cfg.routed_hidden + cfg.shared_width
    return {"num_experts": 0, "dense_mlp_type": "swiglu", "mlp_ratio": width / cfg.hidden_size}


def default_variants(seeds: int = 2) -> list[Variant]:
    out = []
    for s in range(seeds):
        out.append(Variant(f"dense_seed{s}", matched_dense_overrides(), s, "dense SwiGLU, same activated MACs"))
        out.append(Variant(f"moe_seed{s}", {}, s, "8 experts top-2 + shared, alpha 0.01"))
    out += [
        Variant("moe_no_shared", {"shared_hidden": 0}, 0, "no shared expert (fewer activated MACs)"),
        Variant("moe_alpha0", {"aux_alpha": 0.0}, 0, "no balance loss"),
        Variant("moe_alpha0.005", {"aux_alpha": 0.005}, 0, "balance loss 0.005 (the paper's best)"),
        Variant("moe_16experts", {"num_experts": 16}, 0, "16 experts top-2 + shared"),
    ]
    return out


def _train_flops(model_cfg, steps: int, batch: int) -> float:
    """Training FLOPs: 2 x MACs per forward, forward + backward = 3 forwards."""
    from .accounting import model_stats

    macs = model_stats(model_cfg, image_size=model_cfg.input_size, vae_downsample=1).gmacs * 1e9
    return 3 * 2 * macs * steps * batch


def _loss_curve(run: Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    with open(run / "metrics.csv") as f:
        for row in csv.DictReader(f):
            steps.append(int(row["step"]))
            losses.append(float(row["diffusion"]))
    return steps, losses


def run_study(out: str | Path, steps: int = 2200, global_batch: int = 64, lr: float = 1e-3,
              samples_per_class: int = 20, sample_steps: int = 50, cfg_scale: float = 2.0,
              variants: list[Variant] | None = None, data: str = "mnist", model: str = BASE_MODEL,
              model_overrides: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    import torch

    from .config import TrainConfig
    from .eval.evaluate import compute_reference_stats, evaluate
    from .generate import generate, load_for_sampling, to_uint8_nhwc
    from .train.loop import Trainer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    variants = variants or default_variants()
    results = []
    ref_stats = None
    for v in variants:
        run = out / v.name
        cfg = TrainConfig(model=model, data=data, out=str(run), steps=steps, global_batch=global_batch, lr=lr,
                          warmup_steps=min(200, steps // 5), ema_decay=0.999, grad_clip=1.0, seed=v.seed,
                          log_every=max(1, steps // 20), ckpt_every=steps, keep_last=1, resume="auto",
                          progress=progress)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, {**(model_overrides or {}), **v.overrides})
        summary = trainer.run()
        train_s = time.perf_counter() - t0
        if summary["steps_this_run"] == 0 and (run / "train_summary.json").exists():
            # a finished run was resumed: report the time it took when it was trained, not the resume
            train_s = json.loads((run / "train_summary.json").read_text()).get("seconds", train_s)
        loaded = load_for_sampling(run / "model_ema.safetensors")
        labels = torch.arange(loaded.model.config.num_classes).repeat_interleave(samples_per_class)
        images = to_uint8_nhwc(generate(loaded.model, loaded.process, labels, steps=sample_steps,
                                        cfg_scale=cfg_scale, seed=1234, batch_size=100, progress=False))
        if ref_stats is None:
            ref_stats = out / "reference_stats.npz"
            if data == "mnist":
                from .eval.mnist_classifier import ensure_mnist_classifier
                from .eval.reference import load_reference_images

                ensure_mnist_classifier()
                # the 10k MNIST test images padded to 32 px, as the models train on them
                compute_reference_stats(load_reference_images("mnist"), extractor="mnist", out=ref_stats)
            else:  # the smoke test: real images of the same source as the reference
                from .data import build_dataset

                ds, _ = build_dataset(data, image_size=loaded.model.config.input_size)
                real = torch.stack([ds[i][0] for i in range(min(len(ds), 500))])
                compute_reference_stats(to_uint8_nhwc(real), extractor="mnist", out=ref_stats)
        metrics = evaluate(images, ref_stats, extractor="mnist", labels=labels.numpy())
        curve = _loss_curve(run)
        results.append({
            "name": v.name, "note": v.note, "seed": v.seed, "overrides": v.overrides,
            "fid": metrics["fid"], "class_agreement": metrics["class_agreement"],
            "precision": metrics["precision"], "recall": metrics["recall"],
            "final_loss": curve[1][-1] if curve[1] else None, "train_seconds": train_s,
            "train_flops": _train_flops(trainer.model_cfg, steps, global_batch),
            "parameters": summary["parameters"], "curve": {"step": curve[0], "loss": curve[1]},
        })
        (out / "study.json").write_text(json.dumps({"steps": steps, "global_batch": global_batch, "lr": lr,
                                                    "samples_per_class": samples_per_class, "results": results},
                                                   indent=2))
        print(f"[study] {v.name}: FID(mnist-cnn) {metrics['fid']:.1f}, class agreement "
              f"{metrics['class_agreement']:.3f}, {train_s / 60:.1f} min")
    make_study_figures(results, out)
    return {"results": results, "out": str(out)}


def make_study_figures(results: list[dict[str, Any]], out: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for r in results:
        ax.plot(r["curve"]["step"], r["curve"]["loss"], label=r["name"], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("diffusion loss (velocity MSE)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("training loss (mean over each log window)")
    fig.tight_layout()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1], dpi=110)

    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for r in results:
        color = "tab:blue" if r["name"].startswith("dense") else "tab:red"
        ax.scatter(r["train_flops"] / 1e12, r["fid"], color=color)
        ax.annotate(r["name"], (r["train_flops"] / 1e12, r["fid"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("training compute (TFLOPs, activated)")
    ax.set_ylabel("FID (mnist-cnn features), lower is better")
    ax.set_title("FID against training FLOPs")
    fig.tight_layout()
    paths.append(out / "fid_vs_flops.png")
    fig.savefig(paths[-1], dpi=110)
    return paths
