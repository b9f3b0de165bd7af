"""stats.json and a short markdown report that checks the paper's three routing findings."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from .stats import findings as evaluate_findings


def _f(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


def _verdict(holds: bool | None) -> str:
    return {True: "HOLDS", False: "DOES NOT HOLD", None: "NOT TESTABLE"}[holds]


def _finding_i(f: dict[str, Any]) -> list[str]:
    v = f["values"]
    return [
        f"### (i) Expert choice depends on spatial position and time step, hardly on class: **{_verdict(f['holds'])}**",
        "",
        f"Rule: {f['rule']}.",
        "",
        f"- excess MI, mean over layers: position {_f(v['position_excess_bits'])} bits, step "
        f"{_f(v['step_excess_bits'])} bits, class {_f(v['class_excess_bits'])} bits",
        f"- position-dependent: {_f(f['position_dependent'])}; step-dependent: {_f(f['step_dependent'])}; "
        f"layers where the rule holds on their own: {f['layers_holding']}",
        "",
    ]


def _finding_ii(f: dict[str, Any]) -> list[str]:
    lines = [f"### (ii) Deeper layers move from position-specific to dispersed, balanced choice: "
             f"**{_verdict(f['holds'])}**", "", f"Rule: {f['rule']}.", ""]
    v = f["values"]
    if not v:
        return lines
    sh, dp = v["shallow"], v["deep"]
    lines += [
        "| layers | position excess MI (bits) | H(E\\|position)/log E | H(E)/log E | load CV |",
        "| --- | --- | --- | --- | --- |",
        f"| shallower half | {_f(sh['position_excess_bits'])} | {_f(sh['position_cond_entropy_norm'])} | "
        f"{_f(sh['entropy_norm'])} | {_f(sh['load_cv'])} |",
        f"| deeper half | {_f(dp['position_excess_bits'])} | {_f(dp['position_cond_entropy_norm'])} | "
        f"{_f(dp['entropy_norm'])} | {_f(dp['load_cv'])} |",
        "",
        f"- Spearman rho with depth: position excess MI {_f(v['rho_depth_position_excess'], 3)}, "
        f"H(E)/log E {_f(v['rho_depth_entropy_norm'], 3)}, load CV {_f(v['rho_depth_load_cv'], 3)}",
        f"- first layer: position excess {_f(v['first_layer']['position_excess_bits'])} bits, H/log E "
        f"{_f(v['first_layer']['entropy_norm'])}, CV {_f(v['first_layer']['load_cv'])}; last layer: "
        f"{_f(v['last_layer']['position_excess_bits'])} bits, {_f(v['last_layer']['entropy_norm'])}, "
        f"{_f(v['last_layer']['load_cv'])}",
        f"- less position-specific: {_f(f['less_position_specific'])}; more dispersed and balanced: "
        f"{_f(f['more_dispersed_balanced'])}",
        "",
    ]
    return lines


def _finding_iii(f: dict[str, Any]) -> list[str]:
    lines = [f"### (iii) Choice is concentrated at early, high-noise steps and uniform after about half "
             f"of them: **{_verdict(f['holds'])}**", "", f"Rule: {f['rule']}.", ""]
    v = f["values"]
    if not v:
        return lines
    settle = "never" if v["settle_step"] is None else f"step {v['settle_step']} ({_f(v['settle_fraction'], 2)} of {v['steps']})"
    lines += [
        f"- normalised entropy H/log E (layer mean): first half of the steps {_f(v['first_half_entropy_norm'])}, "
        f"second half {_f(v['second_half_entropy_norm'])}, gain {_f(v['gain'])}; first step "
        f"{_f(v['first_step_entropy_norm'])}, last step {_f(v['last_step_entropy_norm'])}",
        f"- settles at: {settle}",
        f"- concentrated early: {_f(f['concentrated_early'])}; uniform late: {_f(f['uniform_late'])}; settles "
        f"by the limit: {_f(f['settles_by_half'])}; layers where the first two conditions hold on their own: "
        f"{f['layers_holding']}",
        "",
    ]
    return lines


def _layer_table(stats: dict[str, Any]) -> list[str]:
    lines = [
        "| layer | tokens | H/log E | load CV | max/mean | MI class (base) | MI position (base) | MI step (base) "
        "| H/log E steps 1st half | 2nd half |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for lay in stats["layers"]:
        mi = lay["mi"]
        cells = [str(lay["layer"]), str(lay["tokens"]), _f(lay["entropy_norm"]), _f(lay["load_cv"]),
                 _f(lay["load_max_over_mean"], 3)]
        cells += [f"{_f(mi[v]['mi_bits'])} ({_f(mi[v]['baseline_bits'])})" for v in ("class", "position", "step")]
        cells += [_f(lay["step_entropy_first_half"]), _f(lay["step_entropy_second_half"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def render_report(stats: dict[str, Any], figures: Sequence[str | os.PathLike] | None = None,
                  out_dir: str | os.PathLike | None = None) -> str:
    """The markdown text of the report (figure links relative to out_dir when given)."""
    f = stats.get("findings") or evaluate_findings(stats, stats.get("thresholds"))
    n_tokens = sum(lay["tokens"] for lay in stats["layers"]) // max(1, len(stats["layers"]))
    lines = [
        "# Routing analysis: expert specialisation",
        "",
        f"{stats['num_layers']} MoE layers (blocks {stats['layers_block_index']}), {stats['num_experts']} experts, "
        f"top-{stats['top_k']}, {stats['num_classes']} classes, {stats['num_steps']} sampling steps, "
        f"{stats['num_positions']} token positions ({stats['grid_size']}x{stats['grid_size']} grid). "
        f"Branch analysed: {stats['branch']}; {n_tokens} tokens routed per layer.",
        "",
        "Expert choice is counted per (token, slot). MI is the plug-in estimate in bits; the baseline is the "
        f"mean MI of {stats['permutations']} tables with the same marginals (labels shuffled among slots; "
        "Miller-Madow approximation when 0), and excess = MI - baseline. Step 0 is the first, noisiest step.",
        "",
        "## Findings of the paper, checked",
        "",
        *_finding_i(f["i"]),
        *_finding_ii(f["ii"]),
        *_finding_iii(f["iii"]),
        "## Per layer",
        "",
        *_layer_table(stats),
    ]
    if figures:
        lines += ["## Figures", ""]
        for p in figures:
            p = Path(p)
            rel = os.path.relpath(p, out_dir) if out_dir is not None else str(p)
            lines.append(f"![{p.stem}]({rel})")
        lines.append("")
    return "\n".join(lines)


def write_report(stats: dict[str, Any], out_dir: str | os.PathLike,
                 figures: Sequence[str | os.PathLike] | None = None) -> tuple[Path, Path]:
    """Write out_dir/stats.json and out_dir/report.md; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "stats.json", out / "report.md"
    json_path.write_text(json.dumps(stats, indent=1, allow_nan=False))
    md_path.write_text(render_report(stats, figures, out))
    return json_path, md_path
