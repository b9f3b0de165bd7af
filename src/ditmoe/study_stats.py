"""Statistics of `ditmoe study`: spreads over seeds, the paired comparison rule and the verdicts.

Pure functions on plain numbers (no torch, no files), so every rule can be checked by hand.

The comparison rule (`paired_comparison`, the only place a difference is called):
    For variants A and B and a metric, take the seeds both were trained with (the same seed is the
    same weight initialisation and data order, so each seed is a pair). Let d_s be A's advantage in
    seed s (B - A for a lower-is-better metric such as FID, A - B otherwise), n the number of
    shared seeds, mean(d) their mean and sd(d) their sample standard deviation (n - 1 in the
    denominator). "A better" is called only when
      1. n >= min_seeds (3 by default: the study's seed count), and
      2. d_s > 0 in every shared seed (sign consistency), and
      3. mean(d) > sd(d), i.e. the paired t statistic mean(d) / (sd(d) / sqrt(n)) exceeds sqrt(n)
         (1.73 for three seeds); an sd of 0 with every d_s > 0 passes.
    "B better" is the same with the roles exchanged. Anything else is "no difference at this
    budget". With three seeds and no true difference (independent, symmetric noise), condition 2
    alone holds with probability 1/8 for a named direction (1/4 for either); condition 3 lowers
    that further, removing sign-consistent triples whose differences scatter as widely as they
    are large. It is a deliberately strict rule for a small study, not a significance test.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

NO_DIFFERENCE = "no difference at this budget"
MIN_SEEDS = 3
# Metrics of a run entry the summary spreads over seeds, and whether lower is better.
METRICS = {"fid": True, "class_agreement": False, "final_loss": True, "step_seconds": True, "train_seconds": True}
COMPARISON_RULE = ("paired over the shared seeds (same seed = same initialisation and data order): "
                   f"A better only when n >= {MIN_SEEDS} shared seeds, A beats B in every one of them, and "
                   "the mean paired difference exceeds its sample standard deviation (paired t > sqrt(n)); "
                   f"otherwise '{NO_DIFFERENCE}'")


def spread(values: Iterable[float | None]) -> dict[str, Any]:
    """{"n", "mean", "std", "min", "max"} of the finite values (std: sample, n - 1; 0 for one value;
    every field but n None for none)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = sum(v) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    return {"n": n, "mean": mean, "std": std, "min": min(v), "max": max(v)}


def summarize_runs(runs: Iterable[Mapping[str, Any]], metrics: Mapping[str, bool] = METRICS) -> dict[str, Any]:
    """Per variant: its seeds and the spread over them of each metric. `runs`: entries with
    "variant", "seed" and the metric keys."""
    by_variant: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], []).append(r)
    out = {}
    for name, rs in by_variant.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        out[name] = {"seeds": [r["seed"] for r in rs], **{m: spread(r.get(m) for r in rs) for m in metrics}}
    return out


def per_seed(runs: Iterable[Mapping[str, Any]], variant: str, metric: str) -> dict[int, float]:
    """{seed: value} of one variant's metric (finite values only)."""
    out = {}
    for r in runs:
        v = r.get(metric)
        if r["variant"] == variant and v is not None and math.isfinite(float(v)):
            out[int(r["seed"])] = float(v)
    return out


def paired_comparison(a: Mapping[int, float], b: Mapping[int, float], lower_is_better: bool = True,
                      names: tuple[str, str] = ("A", "B"), min_seeds: int = MIN_SEEDS) -> dict[str, Any]:
    """Compare A and B ({seed: value}) by the module's rule. Returns the shared seeds, the paired
    advantages of A (positive = A better), their mean, sd and t, "better" (a name or None) and
    "verdict" ("<name> better" or "no difference at this budget") with the "reason"."""
    seeds = sorted(set(a) & set(b))
    d = [(b[s] - a[s]) if lower_is_better else (a[s] - b[s]) for s in seeds]
    n = len(d)
    mean = sum(d) / n if n else None
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else None
    t = None
    if n > 1:
        t = mean / (sd / math.sqrt(n)) if sd > 0 else None  # None: no scatter (JSON has no infinity)
    better, reason = None, ""
    if n < min_seeds:
        reason = f"{n} shared seed(s), fewer than the {min_seeds} a call needs"
    elif all(x > 0 for x in d) and mean > sd:
        better, reason = names[0], f"{names[0]} better in all {n} seeds and mean advantage {mean:.4g} > sd {sd:.4g}"
    elif all(x < 0 for x in d) and -mean > sd:
        better, reason = names[1], f"{names[1]} better in all {n} seeds and mean advantage {-mean:.4g} > sd {sd:.4g}"
    elif not (all(x > 0 for x in d) or all(x < 0 for x in d)):
        wins = sum(x > 0 for x in d)
        reason = f"{names[0]} better in {wins} of {n} seeds: the sign is not consistent"
    else:
        reason = f"consistent sign but mean advantage {abs(mean):.4g} <= sd {sd:.4g}"
    return {"a": names[0], "b": names[1], "seeds": seeds, "advantage_of_a": d, "mean": mean, "sd": sd, "t": t,
            "lower_is_better": lower_is_better, "better": better,
            "verdict": f"{better} better" if better else NO_DIFFERENCE, "reason": reason}


def compare(runs: list[Mapping[str, Any]], a: str, b: str, metric: str = "fid",
            min_seeds: int = MIN_SEEDS) -> dict[str, Any]:
    """`paired_comparison` of variants a and b on one metric of the run entries."""
    res = paired_comparison(per_seed(runs, a, metric), per_seed(runs, b, metric), METRICS.get(metric, True),
                            (a, b), min_seeds)
    res["metric"] = metric
    return res


def _present(runs: list[Mapping[str, Any]], names: Iterable[str]) -> list[str]:
    have = {r["variant"] for r in runs}
    return [n for n in names if n in have]


def verdicts(runs: list[Mapping[str, Any]], routers: Iterable[str], dense: str = "dense",
             base: str = "topk_softmax", metric: str = "fid", min_seeds: int = MIN_SEEDS) -> dict[str, Any]:
    """Plain answers to the study's questions, each built on `compare` (FID by default):
    any_router_beats_dense, best_router, shared_expert_helps, more_experts_help, balance_loss_helps.
    A question whose variants were not run says so ("not run")."""
    out: dict[str, Any] = {}
    routers = _present(runs, routers)

    # 1. does any router beat dense at matched compute?
    if dense in {r["variant"] for r in runs} and routers:
        comps = [compare(runs, r, dense, metric, min_seeds) for r in routers]
        winners = [c["a"] for c in comps if c["better"] == c["a"]]
        losers = [c["a"] for c in comps if c["better"] == dense]
        parts = []
        if winners:
            parts.append(f"yes: {', '.join(winners)} beat{'s' if len(winners) == 1 else ''} dense")
        else:
            parts.append("no: no router beats dense")
        if losers:
            parts.append(f"dense beats {', '.join(losers)}")
        rest = [c["a"] for c in comps if c["better"] is None]
        if rest:
            parts.append(f"{NO_DIFFERENCE} for {', '.join(rest)}")
        answer = "; ".join(parts)
        out["any_router_beats_dense"] = {"answer": answer, "comparisons": comps}
    else:
        out["any_router_beats_dense"] = {"answer": "not run", "comparisons": []}

    # 2. which router is best? The lowest mean must beat every other router by the rule.
    if len(routers) >= 2:
        means = {r: spread(per_seed(runs, r, metric).values())["mean"] for r in routers}
        lower = METRICS.get(metric, True)
        ranked = sorted((r for r in routers if means[r] is not None), key=lambda r: means[r], reverse=not lower)
        top = ranked[0] if ranked else None
        comps = [compare(runs, top, r, metric, min_seeds) for r in ranked[1:]] if top else []
        not_beaten = [c["b"] for c in comps if c["better"] != top]
        if top and not not_beaten:
            answer = f"{top}: it beats every other router"
        elif top:
            answer = (f"no single best router ({NO_DIFFERENCE}): {top} has the best mean {metric} but does not beat "
                      f"{', '.join(not_beaten)}")
        else:
            answer = "not run"
        out["best_router"] = {"answer": answer, "ranking": ranked, "means": means, "comparisons": comps}
    else:
        out["best_router"] = {"answer": "not run (needs two routers)", "comparisons": []}

    def pair(key: str, a: str, b: str, yes: str, no: str) -> None:
        if not _present(runs, [a]) or not _present(runs, [b]):
            out[key] = {"answer": "not run", "comparisons": []}
            return
        c = compare(runs, a, b, metric, min_seeds)
        answer = yes if c["better"] == a else no if c["better"] == b else NO_DIFFERENCE
        out[key] = {"answer": answer, "comparisons": [c]}

    pair("shared_expert_helps", base, "no_shared", "yes: with the shared expert is better",
         "no: without the shared expert is better")
    # 4. more experts: 16 at the same width (more parameters) and fine-grained (same parameters).
    if _present(runs, [base]) and _present(runs, ["e16", "fine_grained"]):
        comps = [compare(runs, v, base, metric, min_seeds) for v in _present(runs, ["e16", "fine_grained"])]
        parts = []
        for c in comps:
            word = "better" if c["better"] == c["a"] else "worse" if c["better"] == base else NO_DIFFERENCE
            parts.append(f"{c['a']} against {base}: {word}")
        out["more_experts_help"] = {"answer": "; ".join(parts), "comparisons": comps}
    else:
        out["more_experts_help"] = {"answer": "not run", "comparisons": []}
    pair("balance_loss_helps", base, "alpha0", "yes: the balance loss (alpha 0.01) is better",
         "no: without the balance loss is better")
    return out


__all__ = ["spread", "summarize_runs", "per_seed", "paired_comparison", "compare", "verdicts", "NO_DIFFERENCE",
           "MIN_SEEDS", "METRICS", "COMPARISON_RULE"]
