"""A smoke version of the replication study (issue: reproduce the paper's claims at small scale)."""

import json

import pytest

from ditmoe.registry import get_config
from ditmoe.study import Variant, default_variants, matched_dense_overrides, run_study


def test_dense_baseline_matches_moe_activated_macs():
    from ditmoe.accounting import model_stats

    moe = get_config("DiT-MoE-mnist")
    dense = moe.replace(**matched_dense_overrides())
    a = model_stats(moe, image_size=28, vae_downsample=1).gmacs
    b = model_stats(dense, image_size=28, vae_downsample=1).gmacs
    assert abs(a - b) / a < 0.01  # equal up to the router's E * D per token


def test_default_variants_cover_the_issue():
    names = {v.name for v in default_variants(2)}
    assert {"dense_seed0", "dense_seed1", "moe_seed0", "moe_seed1", "moe_no_shared", "moe_alpha0",
            "moe_alpha0.005", "moe_16experts"} == names


def test_study_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("DITMOE_CACHE", str(tmp_path / "cache"))
    from ditmoe.eval.mnist_classifier import default_classifier_path, train_mnist_classifier

    train_mnist_classifier(default_classifier_path(), epochs=1, limit=600, eval_limit=200, verbose=False)
    variants = [Variant("dense", matched_dense_overrides(), 0), Variant("moe", {}, 0)]
    out = run_study(tmp_path / "study", steps=3, global_batch=8, samples_per_class=2, sample_steps=2,
                    variants=variants, data="digits", model="debug",
                    model_overrides={"input_size": 32, "patch_size": 8}, progress=False)
    data = json.loads((tmp_path / "study" / "study.json").read_text())
    assert [r["name"] for r in data["results"]] == ["dense", "moe"]
    for r in data["results"]:
        assert r["fid"] == pytest.approx(r["fid"]) and r["fid"] >= 0  # finite
        assert 0 <= r["class_agreement"] <= 1 and r["curve"]["step"][-1] == 3
    dense, moe = data["results"]
    assert dense["parameters"] < moe["parameters"]  # same activated compute, fewer total weights
    assert (tmp_path / "study" / "loss_curves.png").exists() and (tmp_path / "study" / "fid_vs_flops.png").exists()
    assert out["out"] == str(tmp_path / "study")
