"""Statistics of recorded routing counts and the decision rules for the paper's three findings.

Everything here works on the count tables of `RoutingResults` (numpy only) and returns plain
JSON-serialisable dicts (floats, ints, lists, None for undefined values).

Mutual information is the plug-in estimate in bits from a contingency table whose rows are the
values of a variable (class, position or step) and whose columns are experts; the unit counted is
one (token, slot) pair. The plug-in estimate is biased upwards, more so for tables with many rows
and few counts, so every MI comes with the value expected when expert choice is independent of
the variable, for the same table size and marginals:
- ``baseline_bits``: the mean MI of tables drawn with the same row and column sums (sequential
  multivariate hypergeometric draws, which is exactly what shuffling the labels among the counted
  slots produces), over ``permutations`` draws;
- ``baseline_analytic_bits``: the Miller-Madow approximation (R-1)(C-1) / (2 N ln 2) over the
  non-empty rows and columns.
``excess_bits`` = MI - baseline (the permutation one when permutations > 0).

Slots are not independent samples (the tokens of one image share its class, noise and step), so
for the class table the slot-level null understates the chance MI when there are few images per
class; the class excess is then an upper bound on real class dependence, which errs on the safe
side for finding (i) ("hardly on class").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .recorder import BRANCHES, RoutingResults

VARIABLES = ("class", "position", "step")

# Decision-rule thresholds (see `findings` and the report, which prints them).
DEFAULT_THRESHOLDS: dict[str, float] = {
    # (i) position and step each carry at least this much excess MI (bits, mean over layers) ...
    "i_min_excess_bits": 0.01,
    # ... and at least this many times the class excess MI.
    "i_ratio_over_class": 5.0,
    # (ii) deeper half of the layers keeps at most this fraction of the shallower half's
    # position excess MI ...
    "ii_max_position_ratio": 0.5,
    # ... and, with 3 or more layers, Spearman rho(depth, position excess MI) is at most this.
    "ii_max_rho": -0.5,
    # ... and the deeper half is more dispersed (H(E|position) higher) while its balance is no
    # worse than the shallower half's by more than this (H(E)/log E lower, load CV higher).
    "ii_balance_tol": 0.02,
    # (iii) the second half of the steps has at least this much higher normalised entropy ...
    "iii_min_entropy_gain": 0.01,
    # ... is close to uniform: normalised entropy at least this ...
    "iii_min_late_entropy": 0.95,
    # ... and the per-step entropy settles (stays within `iii_settle_tol` below the second-half
    # mean) no later than this fraction of the steps.
    "iii_max_settle_fraction": 0.75,
    "iii_settle_tol": 0.02,
}


# --------------------------------------------------------------------------- small helpers
def _clean(x: Any) -> Any:
    """Numpy scalars/arrays to Python; NaN and inf to None (strict JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def _round(a: np.ndarray, digits: int = 6) -> list:
    return np.round(np.asarray(a, dtype=np.float64), digits).tolist()


def entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in bits of distributions along `axis` (p need not be normalised)."""
    p = np.asarray(p, dtype=np.float64)
    tot = p.sum(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = p / tot
        h = -np.where(q > 0, q * np.log2(np.where(q > 0, q, 1.0)), 0.0).sum(axis=axis)
    return np.where(np.squeeze(tot, axis=axis) > 0, h, np.nan)


def normalized_entropy(p: np.ndarray, num_outcomes: int, axis: int = -1) -> np.ndarray:
    """Entropy / log(num_outcomes): 1 for uniform, 0 for a single outcome."""
    h = entropy_bits(p, axis=axis)
    return h / math.log2(num_outcomes) if num_outcomes > 1 else np.full_like(h, np.nan)


def row_normalize(table: np.ndarray) -> np.ndarray:
    """Rows divided by their sums (empty rows stay 0)."""
    table = np.asarray(table, dtype=np.float64)
    s = table.sum(axis=-1, keepdims=True)
    return np.divide(table, s, out=np.zeros_like(table), where=s > 0)


def mutual_information(table: np.ndarray) -> float:
    """Plug-in mutual information in bits between the row and column variables of a count table."""
    t = np.asarray(table, dtype=np.float64)
    n = t.sum()
    if n <= 0:
        return float("nan")
    pr = t.sum(1, keepdims=True) / n
    pc = t.sum(0, keepdims=True) / n
    pj = t / n
    mask = pj > 0
    return float(max(0.0, (pj[mask] * np.log2(pj[mask] / (pr @ pc)[mask])).sum()))


def mi_baseline_analytic(table: np.ndarray) -> float:
    """Miller-Madow bias of the plug-in MI under independence: (R-1)(C-1) / (2 N ln 2) bits."""
    t = np.asarray(table)
    n = float(t.sum())
    if n <= 0:
        return float("nan")
    r = int((t.sum(1) > 0).sum())
    c = int((t.sum(0) > 0).sum())
    return (r - 1) * (c - 1) / (2.0 * n * math.log(2))


def random_table_same_marginals(table: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A table with the row and column sums of `table`, as if the column labels were shuffled."""
    t = np.asarray(table, dtype=np.int64)
    remaining = t.sum(0).copy()
    out = np.zeros_like(t)
    for i, r in enumerate(t.sum(1)):
        if r == 0:
            continue
        draw = rng.multivariate_hypergeometric(remaining, int(r), method="marginals")
        out[i] = draw
        remaining -= draw
    return out


def mi_with_baseline(table: np.ndarray, permutations: int = 3, rng: np.random.Generator | None = None,
                     max_bits: float | None = None) -> dict[str, Any]:
    """MI of a count table with its independence baselines and the excess (all in bits).

    max_bits: the largest MI the table could show (see `analyze_counts`); adds
    ``excess_fraction`` = excess / max_bits.
    """
    t = np.asarray(table, dtype=np.int64)
    t = t[t.sum(1) > 0]  # rows never seen carry no information and inflate nothing
    mi = mutual_information(t)
    analytic = mi_baseline_analytic(t)
    out: dict[str, Any] = {"mi_bits": mi, "baseline_analytic_bits": analytic, "rows": int(len(t)),
                           "samples": int(t.sum())}
    if permutations > 0 and t.size:
        rng = rng if rng is not None else np.random.default_rng(0)
        null = np.array([mutual_information(random_table_same_marginals(t, rng)) for _ in range(permutations)])
        out["baseline_bits"] = float(null.mean())
        out["baseline_std_bits"] = float(null.std(ddof=1)) if permutations > 1 else None
        out["baseline_method"] = "permutation"
    else:
        out["baseline_bits"] = analytic
        out["baseline_std_bits"] = None
        out["baseline_method"] = "miller-madow"
    out["excess_bits"] = mi - out["baseline_bits"]
    out["max_bits"] = max_bits
    out["excess_fraction"] = out["excess_bits"] / max_bits if max_bits and max_bits > 0 else None
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman rank correlation with average ranks for ties; None when undefined."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2:
        return None

    def ranks(a: np.ndarray) -> np.ndarray:
        order = np.argsort(a, kind="mergesort")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=np.float64)
        for v in np.unique(a):  # average ranks of ties
            m = a == v
            r[m] = r[m].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


# --------------------------------------------------------------------------- tables
def branch_tables(results: RoutingResults, branch: str = "cond") -> dict[str, np.ndarray]:
    """Count tables of one branch ("cond", "uncond") or of both summed ("all"), per layer.

    class table rows: the C real classes for "cond", the null label only for "uncond", all C+1
    rows for "all".
    """
    c = results.num_classes
    if branch == "all":
        sel = lambda a: None if a is None else a.sum(axis=1)  # noqa: E731
        cls = results.class_expert.sum(axis=1)
    else:
        b = results.branch_index(branch)
        sel = lambda a: None if a is None else a[:, b]  # noqa: E731
        cls = results.class_expert[:, b, :c] if branch == "cond" else results.class_expert[:, b, c:]
    return {"step": sel(results.step_expert), "position": sel(results.position_expert), "class": cls,
            "coselect": sel(results.coselect), "gate_sum": sel(results.gate_sum),
            "tokens": sel(results.tokens), "step_position": sel(results.step_position_expert),
            "unrouted": sel(results.unrouted)}


def _settle_index(h: np.ndarray, late_mean: float, tol: float) -> int | None:
    """First index from which every value stays at least late_mean - tol."""
    ok = h >= late_mean - tol
    if not ok[-1]:
        return None
    bad = np.nonzero(~ok)[0]
    return int(bad[-1] + 1) if len(bad) else 0


# --------------------------------------------------------------------------- main entry point
def analyze_counts(results: RoutingResults, branch: str = "cond", permutations: int = 3, seed: int = 0,
                   include_tables: bool = True, thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """Per-layer statistics and the verdicts on the paper's findings, as a JSON-ready dict.

    branch: "cond" (the paper's choice), "uncond" or "all". permutations: number of shuffled
    tables per MI baseline (0: Miller-Madow only). include_tables: add the row-normalised
    selection-frequency tables (by step, position, class) and the co-selection matrix.
    """
    th = dict(DEFAULT_THRESHOLDS)
    th.update(thresholds or {})
    rng = np.random.default_rng(seed)
    tabs = branch_tables(results, branch)
    e, k = results.num_experts, results.top_k
    layers = []
    for li, block in enumerate(results.layers):
        step_t, pos_t, cls_t = tabs["step"][li], tabs["position"][li], tabs["class"][li]
        load = pos_t.sum(0).astype(np.float64)  # (E,) slots per expert
        slots = float(load.sum())
        tokens = int(tabs["tokens"][li])
        mean = load.mean()
        h_bits = float(entropy_bits(load)) if slots > 0 else float("nan")
        lay: dict[str, Any] = {
            "layer": int(block),
            "tokens": tokens,
            "slots": int(slots),
            "load_fraction": _round(load / slots) if slots > 0 else None,
            "load_cv": float(load.std() / mean) if mean > 0 else None,
            "load_max_over_mean": float(load.max() / mean) if mean > 0 else None,
            "entropy_bits": h_bits,
            "entropy_norm": h_bits / math.log2(e) if e > 1 else None,
            "gate_mean": _round(np.divide(tabs["gate_sum"][li], load, out=np.zeros(e), where=load > 0)),
        }
        # H(E | position) / log E: how dispersed the choice is at a fixed position.
        pos_rows = pos_t.sum(1)
        if slots > 0 and e > 1:
            hp = entropy_bits(pos_t)
            lay["position_cond_entropy_norm"] = float(np.nansum(hp * pos_rows) / pos_rows.sum() / math.log2(e))
        else:
            lay["position_cond_entropy_norm"] = None
        # Per-step normalised entropy of the expert distribution (finding iii).
        h_step = normalized_entropy(step_t, e)
        valid = np.nonzero(step_t.sum(1) > 0)[0]
        lay["entropy_norm_by_step"] = _round(h_step)
        if len(valid) >= 2:
            half = len(valid) // 2
            first, second = h_step[valid[:half]], h_step[valid[half:]]
            lay["step_entropy_first_half"] = float(first.mean())
            lay["step_entropy_second_half"] = float(second.mean())
        else:
            lay["step_entropy_first_half"] = lay["step_entropy_second_half"] = None
        # The k slots of one token hold k distinct experts, so even a variable that fixes the
        # whole choice leaves log2 k bits: the largest possible MI is H(E) - log2 k. Routers with
        # a variable number of experts per token use the mean number (k for top-k).
        k_mean = slots / tokens if tokens > 0 and slots > 0 else float(k)
        lay["pairs_per_token"] = k_mean
        unrouted = tabs["unrouted"]
        lay["unrouted_fraction"] = (float(unrouted[li]) / tokens if unrouted is not None and tokens > 0 else None)
        max_bits = h_bits - math.log2(max(k_mean, 1.0)) if math.isfinite(h_bits) else None
        lay["mi"] = {
            name: mi_with_baseline(tab, permutations, rng, max_bits)
            for name, tab in (("class", cls_t), ("position", pos_t), ("step", step_t))
        }
        joint = tabs["step_position"]
        if joint is not None:
            # Position dependence within each step (plug-in minus Miller-Madow), bits.
            per = [mutual_information(j[j.sum(1) > 0]) - mi_baseline_analytic(j) if j.sum() else float("nan")
                   for j in joint[li]]
            lay["position_excess_mi_by_step_bits"] = _round(per)
        co = tabs["coselect"][li].astype(np.float64)
        if include_tables:
            lay["freq_by_step"] = _round(row_normalize(step_t))
            lay["freq_by_position"] = _round(row_normalize(pos_t))
            lay["freq_by_class"] = _round(row_normalize(cls_t))
            # [i, j]: share of tokens that picked both i and j; diagonal: share that picked i.
            lay["coselect_prob"] = _round(co / tokens) if tokens > 0 else None
            diag = np.diag(co)
            lay["coselect_given"] = _round(np.divide(co, diag[:, None], out=np.zeros_like(co),
                                                     where=diag[:, None] > 0))
        layers.append(lay)

    stats: dict[str, Any] = {
        "branch": branch,
        "num_layers": results.num_layers,
        "layers_block_index": [int(b) for b in results.layers],
        "num_experts": e,
        "top_k": k,
        "num_classes": results.num_classes,
        "num_steps": results.num_steps,
        "num_positions": results.num_positions,
        "grid_size": results.grid_size,
        "permutations": permutations,
        "thresholds": th,
        "layers": layers,
    }
    stats = _clean(stats)
    stats["findings"] = findings(stats, th)
    return stats


# --------------------------------------------------------------------------- decision rules
def _mean(vals: list) -> float | None:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def findings(stats: dict[str, Any], thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """Evaluate the paper's findings (i) to (iii) on per-layer statistics with explicit rules."""
    th = dict(DEFAULT_THRESHOLDS)
    th.update(thresholds or {})
    lays = stats["layers"]
    n_layers = len(lays)
    exc = {v: [lay["mi"][v]["excess_bits"] for lay in lays] for v in VARIABLES}

    # (i) position and step matter, class hardly.
    m = {v: _mean(exc[v]) for v in VARIABLES}
    tau, ratio = th["i_min_excess_bits"], th["i_ratio_over_class"]

    def strong(x: float | None, cls: float | None) -> bool:
        return x is not None and x >= tau and x >= ratio * max(cls or 0.0, 0.0)

    per_layer_i = [strong(exc["position"][i], exc["class"][i]) and strong(exc["step"][i], exc["class"][i])
                   for i in range(n_layers)]
    f1 = {
        "rule": (f"mean over layers of excess MI (bits): position >= {tau} and step >= {tau}, and each "
                 f">= {ratio} x max(class, 0)"),
        "values": {"position_excess_bits": m["position"], "step_excess_bits": m["step"],
                   "class_excess_bits": m["class"]},
        "position_dependent": strong(m["position"], m["class"]),
        "step_dependent": strong(m["step"], m["class"]),
        "layers_holding": int(sum(per_layer_i)),
    }
    f1["holds"] = bool(f1["position_dependent"] and f1["step_dependent"])

    # (ii) deeper layers: less position-specific, more dispersed and balanced.
    depth = np.arange(n_layers)
    pos = np.array([x if x is not None else np.nan for x in exc["position"]], dtype=np.float64)
    ent = np.array([lay["entropy_norm"] if lay["entropy_norm"] is not None else np.nan for lay in lays])
    cv = np.array([lay["load_cv"] if lay["load_cv"] is not None else np.nan for lay in lays])
    cond_ent = np.array([lay["position_cond_entropy_norm"] if lay["position_cond_entropy_norm"] is not None
                         else np.nan for lay in lays])
    half = n_layers // 2
    if n_layers >= 2:
        shallow, deep = slice(0, half), slice(n_layers - half, n_layers)
        sh = {"position_excess_bits": np.nanmean(pos[shallow]), "entropy_norm": np.nanmean(ent[shallow]),
              "load_cv": np.nanmean(cv[shallow]), "position_cond_entropy_norm": np.nanmean(cond_ent[shallow])}
        dp = {"position_excess_bits": np.nanmean(pos[deep]), "entropy_norm": np.nanmean(ent[deep]),
              "load_cv": np.nanmean(cv[deep]), "position_cond_entropy_norm": np.nanmean(cond_ent[deep])}
        rho_pos = spearman(depth, pos) if n_layers >= 3 else None
        less_positional = bool(sh["position_excess_bits"] > 0 and
                               dp["position_excess_bits"] <= th["ii_max_position_ratio"] * sh["position_excess_bits"]
                               and (rho_pos is None or rho_pos <= th["ii_max_rho"]))
        tol = th["ii_balance_tol"]
        more_dispersed = bool(dp["position_cond_entropy_norm"] > sh["position_cond_entropy_norm"]
                              and dp["entropy_norm"] >= sh["entropy_norm"] - tol
                              and dp["load_cv"] <= sh["load_cv"] + tol)
        f2 = {
            "rule": (f"deeper half of the layers vs shallower half (layer means): position excess MI of "
                     f"the deeper half <= {th['ii_max_position_ratio']} x the shallower half's (and Spearman "
                     f"rho(depth, position excess MI) <= {th['ii_max_rho']} when there are >= 3 layers); and "
                     "the deeper half is more dispersed, H(E|position)/log E higher, and no less balanced: "
                     f"H(E)/log E not lower and load CV not higher by more than {th['ii_balance_tol']}"),
            "values": {"shallow": sh, "deep": dp, "rho_depth_position_excess": rho_pos,
                       "rho_depth_entropy_norm": spearman(depth, ent) if n_layers >= 3 else None,
                       "rho_depth_load_cv": spearman(depth, cv) if n_layers >= 3 else None,
                       "first_layer": {"position_excess_bits": pos[0], "entropy_norm": ent[0], "load_cv": cv[0]},
                       "last_layer": {"position_excess_bits": pos[-1], "entropy_norm": ent[-1], "load_cv": cv[-1]}},
            "less_position_specific": less_positional,
            "more_dispersed_balanced": more_dispersed,
            "holds": bool(less_positional and more_dispersed),
        }
    else:
        f2 = {"rule": "needs at least 2 MoE layers", "values": {}, "holds": None}

    # (iii) concentrated early, uniform after about half of the steps (layer-mean entropy curve).
    curves = np.array([[x if x is not None else np.nan for x in lay["entropy_norm_by_step"]] for lay in lays])
    with np.errstate(invalid="ignore"):
        valid = np.nonzero(np.isfinite(curves).any(0))[0]
    if len(valid) >= 2:
        h = np.nanmean(curves[:, valid], axis=0)
        hs = len(valid) // 2
        early, late = float(h[:hs].mean()), float(h[hs:].mean())
        settle = _settle_index(h, late, th["iii_settle_tol"])
        settle_frac = None if settle is None else settle / len(valid)
        gain = late - early
        per_layer = []
        for row in curves[:, valid]:
            a, b = np.nanmean(row[:hs]), np.nanmean(row[hs:])
            per_layer.append(bool(b - a >= th["iii_min_entropy_gain"] and b >= th["iii_min_late_entropy"]))
        f3 = {
            "rule": (f"per-step normalised entropy of the expert distribution, averaged over layers: "
                     f"second-half mean - first-half mean >= {th['iii_min_entropy_gain']}, second-half mean >= "
                     f"{th['iii_min_late_entropy']}, and the curve stays within {th['iii_settle_tol']} below the "
                     f"second-half mean from a step at most {th['iii_max_settle_fraction']} of the way through"),
            "values": {"first_half_entropy_norm": early, "second_half_entropy_norm": late, "gain": gain,
                       "first_step_entropy_norm": float(h[0]), "last_step_entropy_norm": float(h[-1]),
                       "settle_step": None if settle is None else int(valid[settle]),
                       "settle_fraction": settle_frac, "steps": int(len(valid))},
            "concentrated_early": bool(gain >= th["iii_min_entropy_gain"]),
            "uniform_late": bool(late >= th["iii_min_late_entropy"]),
            "settles_by_half": bool(settle_frac is not None and settle_frac <= th["iii_max_settle_fraction"]),
            "layers_holding": int(sum(per_layer)),
        }
        f3["holds"] = bool(f3["concentrated_early"] and f3["uniform_late"] and f3["settles_by_half"])
    else:
        f3 = {"rule": "needs at least 2 recorded steps", "values": {}, "holds": None}
    return _clean({"i": f1, "ii": f2, "iii": f3, "num_layers": n_layers})


__all__ = ["analyze_counts", "findings", "mutual_information", "mi_baseline_analytic", "mi_with_baseline",
           "random_table_same_marginals", "entropy_bits", "normalized_entropy", "row_normalize", "spearman",
           "branch_tables", "DEFAULT_THRESHOLDS", "VARIABLES", "BRANCHES"]
