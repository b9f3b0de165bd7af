"""The report of `ditmoe study`: the content of study.json as Markdown tables and plain verdicts.

`run_study` writes OUT/report.md after every finished run; `ditmoe study --report --out OUT`
prints it again from OUT/study.json without training anything. The spreads, comparisons and
verdicts are read from study.json (where `ditmoe.study_stats` put them), so the report and
study.json cannot disagree; the only arithmetic here is the sum of the runs' times.

Pure functions on the study.json dict (no torch), so the tables can be checked by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

FINDINGS = {"i": "position and step matter, class hardly", "ii": "less position-specific and more balanced deeper",
            "iii": "concentrated early in sampling, uniform later"}
QUESTIONS = {"any_router_beats_dense": "Does any router beat dense at matched activated compute?",
             "best_router": "Which router is best?",
             "shared_expert_helps": "Does the shared expert help?",
             "more_experts_help": "Do more experts help?",
             "balance_loss_helps": "Does the balance loss of topk_softmax help?"}


def mean_sd(s: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 1, minmax: bool = False) -> str:
    """'mean ± sd' (sd over seeds, n - 1) of a `study_stats.spread`, optionally '(min-max)'; '-' when empty."""
    if not s or s.get("mean") is None:
        return "-"
    text = f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"
    if minmax:
        text += f" ({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f})"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _variant_names(doc: Mapping[str, Any]) -> list[str]:
    """The variants with results, in the order the study ran them."""
    order = list(doc.get("settings", {}).get("variants", [])) + list(doc.get("summary", {}))
    return [n for n in dict.fromkeys(order) if n in doc.get("summary", {})]


def results_table(doc: Mapping[str, Any]) -> list[str]:
    """One row per variant: seeds, parameters, FLOPs, step time and the scores as mean ± sd over seeds."""
    rows = []
    for name in _variant_names(doc):
        s, v = doc["summary"][name], doc["variants"].get(name, {})
        rows.append([f"`{name}`", ",".join(map(str, s["seeds"])),
                     f"{v.get('activated_params', 0) / 1e6:.2f} M / {v.get('total_params', 0) / 1e6:.2f} M",
                     f"{v.get('train_flops', 0) / 1e12:.1f}", f"{v.get('macs_ratio', 0):.3f}",
                     mean_sd(s["step_seconds"], 1000, 0), mean_sd(s["fid"], 1, 1, minmax=True),
                     mean_sd(s["class_agreement"], 1, 3), mean_sd(s["final_loss"], 1, 4)])
    return _table(["variant", "seeds", "activated / total params", "training TFLOPs", "MACs vs base",
                   "step (ms)", "FID mean ± sd (min-max)", "class agreement", "final loss"], rows)


def per_seed_table(doc: Mapping[str, Any], metric: str = "fid", digits: int = 1) -> list[str]:
    """The metric of every variant in every seed: the pairs the comparisons are made of."""
    seeds = sorted({r["seed"] for r in doc["runs"]})
    rows = []
    for name in _variant_names(doc):
        by_seed = {r["seed"]: r.get(metric) for r in doc["runs"] if r["variant"] == name}
        rows.append([f"`{name}`", *(f"{by_seed[s]:.{digits}f}" if by_seed.get(s) is not None else "-"
                                    for s in seeds)])
    return _table(["variant", *(f"seed {s}" for s in seeds)], rows)


def routing_table(doc: Mapping[str, Any]) -> list[str]:
    """Per MoE variant: excess mutual information (bits, mean over layers, mean ± sd over seeds) of
    the expert choice with position, sampling step and class, and in how many seeds each finding holds."""
    rows = []
    for name in _variant_names(doc):
        r = doc["summary"][name].get("routing")
        if not r:
            continue
        held = r.get("findings_holding", {})
        n = len(doc["summary"][name]["seeds"])
        rows.append([f"`{name}`", *(mean_sd(r[k], 1, 3) for k in ("position", "step", "class")),
                     *(f"{held.get(k, 0)} of {n}" for k in FINDINGS)])
    return _table(["variant", "position (bits)", "step (bits)", "class (bits)",
                   *(f"({k}) {text}" for k, text in FINDINGS.items())], rows)


def comparisons_table(doc: Mapping[str, Any], metric: str = "fid") -> list[str]:
    """Every paired comparison of the study on one metric: A's advantage per seed, its mean and sd,
    and the verdict of the rule."""
    rows = []
    for c in doc.get("comparisons", []):
        if c.get("metric") != metric:
            continue
        digits = 1 if metric == "fid" else 3
        adv = ", ".join(f"{x:+.{digits}f}" for x in c["advantage_of_a"])
        if c["mean"] is None:
            stat = "-"
        else:
            stat = f"{c['mean']:+.{digits + 1}f} / " + (f"{c['sd']:.{digits + 1}f}" if c["sd"] is not None else "-")
        rows.append([f"`{c['a']}` vs `{c['b']}`", adv or "-", stat, c["verdict"]])
    return _table(["A vs B", "A's advantage per seed", "mean / sd", "verdict"], rows)


def time_summary(doc: Mapping[str, Any]) -> dict[str, float]:
    """Seconds the study's runs spent training (the trainer's own totals), sampling and scoring,
    summed over runs (runs finished in an earlier session without a training total count 0)."""
    out = {"train": 0.0, "sample": 0.0, "eval": 0.0}
    for r in doc["runs"]:
        out["train"] += r.get("train_wall_seconds") or 0.0
        out["sample"] += r.get("sample_seconds") or 0.0
        out["eval"] += r.get("eval_seconds") or 0.0
    out["total"] = out["train"] + out["sample"] + out["eval"]
    return out


def render_markdown(doc: Mapping[str, Any]) -> str:
    """The whole report: settings, results, per-seed FID and agreement, routing, comparisons, verdicts."""
    st = doc["settings"]
    tr, smp = st["train"], st["sampling"]
    t = time_summary(doc)
    lines = [
        "# ditmoe study: results",
        "",
        f"Recipe `{Path(st['recipe']).name}`, model `{st['model']}`, data `{st['data']}`, {tr['steps']} steps of "
        f"{tr['global_batch']} images per run (lr {tr['lr']}, {tr['lr_decay']} decay), seeds "
        f"{', '.join(map(str, st['seeds']))}; {st['samples_per_class'] * 10} samples per model "
        f"({smp['sampler']}, {smp['steps']} steps, guidance {smp['cfg_scale']}). {len(doc['runs'])} runs; their "
        f"own time: training {t['train'] / 60:.1f} min, sampling {t['sample'] / 60:.1f} min, scoring "
        f"{t['eval'] / 60:.1f} min, {t['total'] / 3600:.2f} h in all.",
        "",
        "Mean ± sample sd over seeds; FID on the MNIST classifier's features, lower is better.",
        "",
        *results_table(doc),
        "",
        "## FID per seed",
        "",
        *per_seed_table(doc, "fid", 1),
        "",
        "## Class agreement per seed",
        "",
        *per_seed_table(doc, "class_agreement", 3),
        "",
        "## Routing (excess mutual information of the expert choice, bits; findings: seeds in which each holds)",
        "",
        *routing_table(doc),
        "",
        "## Paired comparisons on FID (advantage = B's FID - A's FID; positive: A better)",
        "",
        *comparisons_table(doc, "fid"),
        "",
        "## Paired comparisons on class agreement (advantage = A's - B's)",
        "",
        *comparisons_table(doc, "class_agreement"),
        "",
        "## Verdicts (FID, by the rule below)",
        "",
        *(f"- {QUESTIONS.get(k, k)} **{v['answer']}**" for k, v in doc.get("verdicts", {}).items()),
        "",
        f"Rule: {doc.get('rule', '')}.",
        "",
    ]
    return "\n".join(lines)


def write_report(doc: Mapping[str, Any], out: str | Path) -> Path:
    """OUT/report.md, written whole (a temporary file renamed over the old report)."""
    from .weights_io import atomic_write

    path = Path(out) / "report.md"
    text = render_markdown(doc)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


__all__ = ["render_markdown", "write_report", "results_table", "per_seed_table", "routing_table",
           "comparisons_table", "time_summary", "mean_sd"]
