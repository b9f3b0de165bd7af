"""`ditmoe report`: one self-contained HTML page per run, each section only when its files exist."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from ditmoe.run_report import read_expert_load, read_metrics, write_run_report

SECTION_IDS = ("config", "curves", "load", "previews", "samples", "eval", "analysis")


def _png(path: Path, size: int = 24, seed: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path)


def _minimal_run(root: Path) -> Path:
    """config.json + metrics.csv only, as `ditmoe train` writes them."""
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "train": {"model": "debug", "data": "digits", "process": "flow", "steps": 40, "global_batch": 16, "lr": 1e-3},
        "model": {"name": "debug", "hidden_size": 32, "depth": 2, "num_experts": 4, "top_k": 2}}))
    lines = ["step,balance,diffusion,expert_load_cv,grad_norm,images_per_s,loss,lr,mse"]
    for s in (10, 20, 30, 40):
        lines.append(f"{s},{0.02 - s * 1e-4:.5f},{1.0 / s:.5f},{0.5 / s:.4f},1.5,{200 + s},{1.0 / s + 0.01:.5f},0.001,"
                     f"{1.0 / s:.5f}")
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run


def _full_run(root: Path) -> Path:
    run = _minimal_run(root)
    rows = ["step,layer,expert_0,expert_1,expert_2,expert_3"]
    for s in (10, 20, 30, 40):
        for layer in (0, 1):
            rows.append(f"{s},{layer},0.40000,0.30000,0.20000,0.10000")
    (run / "expert_load.csv").write_text("\n".join(rows) + "\n")
    (run / "train_summary.json").write_text(json.dumps({"steps": 40, "steps_this_run": 40, "seconds": 12.0,
                                                        "images_per_s": 230.0, "model": "debug",
                                                        "parameters": 123456, "precision": "fp32"}))
    _png(run / "previews" / "step_0000020.png", seed=2)
    _png(run / "previews" / "step_0000010.png", seed=1)
    _png(run / "samples" / "grid.png", size=40, seed=3)
    (run / "samples" / "sample_config.json").write_text(json.dumps({"sampler": "euler", "steps": 50, "cfg_scale": 2.0,
                                                                     "weights": "ema", "num_images": 16}))
    (run / "eval.json").write_text(json.dumps({"extractor": "mnist-cnn", "num_samples": 500, "num_ref": 10000,
                                               "fid": 150.5, "sfid": None, "inception_score": None,
                                               "inception_score_std": None, "precision": 0.5, "recall": 0.6,
                                               "class_agreement": 0.8}))
    (run / "eval_real_floor.json").write_text(json.dumps({"extractor": "mnist-cnn", "num_samples": 500,
                                                          "num_ref": 10000, "fid": 20.4, "precision": 0.87,
                                                          "recall": 0.9, "class_agreement": 0.99}))
    stats = {"num_layers": 2, "num_experts": 4, "top_k": 2, "num_classes": 10, "num_steps": 50,
             "setup": {"sampler": "euler", "cfg_scale": 2.0, "per_class": 10},
             "findings": {"i": {"rule": "position and step excess MI >= 0.01 bits", "holds": True,
                                "values": {"position_excess_bits": 0.2, "step_excess_bits": 0.1}},
                          "ii": {"rule": "needs at least 2 MoE layers", "values": {}, "holds": None},
                          "iii": {"rule": "entropy rises", "holds": False,
                                  "values": {"gain": -0.01, "settle_step": None}}}}
    (run / "analysis").mkdir()
    (run / "analysis" / "stats.json").write_text(json.dumps(stats))
    _png(run / "analysis" / "mi_by_layer.png", seed=4)
    return run


def _sections(text: str) -> set[str]:
    return set(re.findall(r'<section id="([a-z]+)"', text))


def _assert_self_contained(text: str) -> None:
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.I)
    assert not re.search(r"<link[^>]*\bhref\s*=", text, re.I)
    assert "url(" not in text and "@import" not in text


def test_full_run_has_every_section_and_is_self_contained(tmp_path):
    run = _full_run(tmp_path)
    path = write_run_report(run)
    assert path == run / "report.html"
    text = path.read_text()
    _assert_self_contained(text)
    assert _sections(text) == set(SECTION_IDS)
    # 1 chart + 1 load chart + 2 previews + grid + 1 analysis figure
    assert len(re.findall(r"<img ", text)) == 6
    assert text.index("step 10") < text.index("step 20")  # previews sorted by step, not by file order
    assert "150.5" in text and "20.4" in text and "real training images" in text
    assert "does not hold" in text and "not testable" in text and "holds" in text


def test_minimal_run_has_only_its_sections(tmp_path):
    run = _minimal_run(tmp_path)
    text = write_run_report(run).read_text()
    _assert_self_contained(text)
    assert _sections(text) == {"config", "curves"}
    assert "Evaluation" not in text and "Routing analysis" not in text


def test_each_section_follows_its_files(tmp_path, monkeypatch):
    from ditmoe import run_report

    # The charts are tested above; here only which sections appear matters.
    monkeypatch.setattr(run_report, "training_curves_uri", lambda m: "data:image/png;base64,")
    monkeypatch.setattr(run_report, "expert_load_uri", lambda *a: ("data:image/png;base64,", {
        "layers": 2, "experts": 4, "cv_first": None, "cv_last": None, "max_share": None}))
    run = _full_run(tmp_path)
    for gone, section in (("eval.json", None), ("eval_real_floor.json", None), ("analysis", "analysis"),
                          ("samples", "samples"), ("previews", "previews"), ("expert_load.csv", "load")):
        target = run / gone
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
        if gone == "eval_real_floor.json":
            section = "eval"  # both evaluation files gone
        text = write_run_report(run).read_text()
        if section:
            assert section not in _sections(text), gone
    assert _sections(text) == {"config", "curves"}


def test_partial_files_do_not_crash(tmp_path):
    run = _full_run(tmp_path)
    with open(run / "metrics.csv", "a") as f:
        f.write("50,0.01")  # a half-written last line
    with open(run / "expert_load.csv", "a") as f:
        f.write("50,0,0.2")
    (run / "eval.json").write_text('{"fid": 1')  # cut off
    m = read_metrics(run / "metrics.csv")
    assert list(m["step"]) == [10, 20, 30, 40]
    steps, layers, loads = read_expert_load(run / "expert_load.csv")
    assert loads.shape == (4, 2, 4) and layers == [0, 1]
    text = write_run_report(run).read_text()
    assert "incomplete or malformed" in text and "eval.json" in text
    assert "eval" in _sections(text)  # the real-data floor row is still there
    # a header-only metrics file and an empty expert load file: sections drop, nothing raises
    (run / "metrics.csv").write_text("step,loss\n")
    (run / "expert_load.csv").write_text("")
    text = write_run_report(run).read_text()
    assert "curves" not in _sections(text) and "load" not in _sections(text)


def test_resumed_run_keeps_the_last_row_per_step(tmp_path):
    run = _minimal_run(tmp_path)
    with open(run / "metrics.csv", "a") as f:  # resumed from step 20: steps 30, 40 logged again
        f.write("30,0.01,0.5,0.1,1.0,100,0.7,0.001,0.5\n40,0.01,0.4,0.1,1.0,100,0.6,0.001,0.4\n")
    m = read_metrics(run / "metrics.csv")
    assert list(m["step"]) == [10, 20, 30, 40] and m["loss"][-1] == pytest.approx(0.6)


def test_cli_writes_the_page_and_refuses_other_folders(tmp_path, capsys):
    from ditmoe.cli import main

    run = _full_run(tmp_path)
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    _assert_self_contained(out.read_text())
    assert main(["report", str(run)]) == 0 and (run / "report.html").is_file()

    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "not a training run" in err and "config.json" in err and "metrics.csv" in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(run / "metrics.csv")]) == 2
    assert "not a folder" in capsys.readouterr().err
