"""Routing analysis: which experts the routers pick, by class, token position and sampling step.

    with RoutingRecorder(model, num_steps) as rec:   # observers on every MoE layer
        ...                                          # rec.set_labels(y_full); rec.set_step(i); model(...)
    results = rec.results()                          # RoutingResults (numpy count tables, .save/.load)
    stats = analyze_counts(results)                  # JSON-ready statistics and verdicts
    paths = make_figures(results, stats, out_dir)    # PNG heatmaps, spatial maps, MI plot
    write_report(stats, out_dir, paths)              # stats.json + report.md
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "RoutingRecorder": "recorder",
    "RoutingResults": "recorder",
    "BRANCHES": "recorder",
    "analyze_counts": "stats",
    "findings": "stats",
    "mutual_information": "stats",
    "mi_with_baseline": "stats",
    "DEFAULT_THRESHOLDS": "stats",
    "make_figures": "figures",
    "write_report": "report",
    "render_report": "report",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:  # lazy, so `import ditmoe.analysis` stays cheap
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
