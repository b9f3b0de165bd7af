"""`ditmoe study` (issue #20): variants at equal activated compute, the statistics rule on planted
numbers, bad input, and a smoke version of the whole study with resume."""

import json
import math

import pytest

from ditmoe import study
from ditmoe import study_stats as st
from ditmoe.cli import main
from ditmoe.study import Variant, all_variants, base_config, check_equal_compute, compute_stats, variant_config

_REAL_SAMPLE_AND_SCORE = study.sample_and_score


# ----------------------------------------------------------------------------- statistics
def test_spread_by_hand():
    s = st.spread([1.0, 2.0, 6.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(3.0) and s["min"] == 1.0 and s["max"] == 6.0
    assert s["std"] == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))  # sqrt(7)
    assert st.spread([5.0])["std"] == 0.0 and st.spread([None, float("nan")])["mean"] is None


def test_consistent_win_is_called():
    a = {0: 40.0, 1: 42.0, 2: 41.0}  # FID: A lower in every seed
    b = {0: 45.0, 1: 46.0, 2: 47.0}
    c = st.paired_comparison(a, b, lower_is_better=True, names=("moe", "dense"))
    assert c["advantage_of_a"] == [5.0, 4.0, 6.0]
    assert c["mean"] == pytest.approx(5.0) and c["sd"] == pytest.approx(1.0)
    assert c["t"] == pytest.approx(5.0 / (1.0 / math.sqrt(3)))
    assert c["better"] == "moe" and c["verdict"] == "moe better"
    # the same numbers seen from the other side, and for a higher-is-better metric
    assert st.paired_comparison(b, a, names=("dense", "moe"))["verdict"] == "moe better"
    assert st.paired_comparison(b, a, lower_is_better=False, names=("x", "y"))["verdict"] == "x better"


def test_mixed_or_scattered_is_no_difference():
    mixed = st.paired_comparison({0: 40.0, 1: 50.0, 2: 41.0}, {0: 45.0, 1: 46.0, 2: 47.0})
    assert mixed["better"] is None and mixed["verdict"] == st.NO_DIFFERENCE and "2 of 3" in mixed["reason"]
    # same sign everywhere, but the differences (1, 1, 10) scatter more than their mean (4 < sd 5.2)
    scattered = st.paired_comparison({0: 44.0, 1: 45.0, 2: 37.0}, {0: 45.0, 1: 46.0, 2: 47.0})
    assert scattered["mean"] == pytest.approx(4.0) and scattered["sd"] == pytest.approx(math.sqrt(27))
    assert scattered["verdict"] == st.NO_DIFFERENCE
    # two shared seeds are too few, however consistent; unshared seeds do not count
    few = st.paired_comparison({0: 1.0, 1: 1.0, 5: 0.0}, {0: 9.0, 1: 9.0, 7: 9.0})
    assert few["seeds"] == [0, 1] and few["verdict"] == st.NO_DIFFERENCE


def _runs(table):
    return [{"variant": v, "seed": s, "fid": f} for v, fids in table.items() for s, f in enumerate(fids)]


def test_verdicts_on_planted_numbers():
    runs = _runs({"dense": [50, 52, 51], "topk_softmax": [45, 46, 47], "race": [44, 55, 48],
                  "expert_choice": [60, 61, 62], "no_shared": [55, 56, 57], "e16": [46, 44, 48],
                  "alpha0": [44, 47, 46]})
    v = st.verdicts(runs, study.ROUTERS_IN_STUDY)
    assert v["any_router_beats_dense"]["answer"].startswith("yes: topk_softmax beats dense")
    assert "expert_choice" in v["any_router_beats_dense"]["answer"]  # dense beats it
    assert v["best_router"]["ranking"][0] == "topk_softmax"
    assert v["best_router"]["answer"].startswith("no single best router")  # race is not beaten in every seed
    assert v["shared_expert_helps"]["answer"].startswith("yes")
    assert v["more_experts_help"]["answer"] == f"e16 against topk_softmax: {st.NO_DIFFERENCE}"
    assert v["balance_loss_helps"]["answer"] == st.NO_DIFFERENCE
    summary = st.summarize_runs(runs)
    assert summary["dense"]["seeds"] == [0, 1, 2] and summary["dense"]["fid"]["mean"] == pytest.approx(51.0)


def _planted_doc():
    """A study.json built from planted per-seed numbers through the study's own analysis."""
    table = {"dense": ([50.0, 52.0, 51.0], [0.80, 0.82, 0.81]), "topk_softmax": ([45.0, 46.0, 47.0], [0.90, 0.85, 0.88]),
             "race": ([44.0, 55.0, 48.0], [0.91, 0.70, 0.86])}
    runs = []
    for v, (fids, agree) in table.items():
        for seed, (f, a) in enumerate(zip(fids, agree)):
            routing = None if v == "dense" else {"mi_excess_bits": {"position": 0.1 * (seed + 1), "step": 0.05,
                                                                    "class": 0.01},
                                                 "findings": {"i": seed == 0, "ii": False, "iii": True}}
            runs.append({"variant": v, "seed": seed, "fid": f, "class_agreement": a, "final_loss": 0.2 + seed / 100,
                         "step_seconds": 0.1, "train_seconds": 120.0, "train_wall_seconds": 125.0,
                         "sample_seconds": 40.0, "eval_seconds": 2.0, "routing": routing, "train_flops": 9.5e12,
                         "curve": {"step": [600, 1200], "loss": [0.4 + seed / 100, 0.2 + seed / 100]}})
    variants = {v: {"activated_params": 1.75e6, "total_params": 4.11e6, "train_flops": 9.5e12, "macs_ratio": 1.0}
                for v in table}
    settings = {"recipe": "/x/configs/mnist.yaml", "model": "DiT-MoE-mnist", "data": "mnist",
                "train": {"steps": 1200, "global_batch": 64, "lr": 1e-3, "lr_decay": "cosine"},
                "sampling": {"sampler": "heun", "steps": 13, "cfg_scale": 1.9}, "samples_per_class": 200,
                "seeds": [0, 1, 2], "variants": list(table)}
    return {"schema": 1, "settings": settings, "variants": variants, "runs": runs, **study.analyse_study(runs)}


def test_report_tables_read_the_planted_numbers():
    from ditmoe.study_report import render_markdown, time_summary

    doc = _planted_doc()
    text = render_markdown(doc)
    # mean ± sample sd (min-max) by hand: dense FIDs 50, 52, 51 -> 51.0 ± 1.0; race 44, 55, 48 -> 49.0 ± 5.6
    assert "| `dense` | 0,1,2 | 1.75 M / 4.11 M | 9.5 | 1.000 | 100 ± 0 | 51.0 ± 1.0 (50.0-52.0) | 0.810 ± 0.010 |" in text
    assert f"49.0 ± {math.sqrt(((44 - 49) ** 2 + (55 - 49) ** 2 + (48 - 49) ** 2) / 2):.1f} (44.0-55.0)" in text
    assert "| `race` | 44.0 | 55.0 | 48.0 |" in text  # FID per seed
    assert "| `topk_softmax` | 0.900 | 0.850 | 0.880 |" in text  # agreement per seed
    # routing: position bits 0.1, 0.2, 0.3 -> 0.200 ± 0.100; finding (i) in seed 0 only, (iii) in all
    assert "| `race` | 0.200 ± 0.100 | 0.050 ± 0.000 | 0.010 ± 0.000 | 1 of 3 | 0 of 3 | 3 of 3 |" in text
    assert "| `dense` | 0.000" not in text  # dense has no routing row
    # comparisons: topk_softmax vs dense, advantages 5, 6, 4 -> called; race vs dense mixed -> not
    assert "| `topk_softmax` vs `dense` | +5.0, +6.0, +4.0 | +5.00 / 1.00 | topk_softmax better |" in text
    assert f"| `race` vs `dense` | +6.0, -3.0, +3.0 | +2.00 / {math.sqrt(21):.2f} | {st.NO_DIFFERENCE} |" in text
    d = [0.90 - 0.80, 0.85 - 0.82, 0.88 - 0.81]  # agreement, 3 decimals per seed, 4 for mean and sd
    m, sd = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    assert f"| `topk_softmax` vs `dense` | +0.100, +0.030, +0.070 | {m:+.4f} / {sd:.4f} |" in text
    assert "Does any router beat dense at matched activated compute? **yes: topk_softmax beats dense" in text
    assert "Does the shared expert help? **not run**" in text
    t = time_summary(doc)
    assert t["train"] == 9 * 125.0 and t["sample"] == 9 * 40.0 and t["total"] == 9 * 167.0
    assert "9 runs; their own time: training 18.8 min, sampling 6.0 min, scoring 0.3 min, 0.42 h in all" in text


def test_report_command(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["study", "--report", "--out", str(out)]) == 2
    assert "study.json does not exist" in capsys.readouterr().err
    out.mkdir()
    (out / "study.json").write_text("{not json")
    assert main(["study", "--report", "--out", str(out)]) == 2
    assert "not readable JSON" in capsys.readouterr().err
    (out / "study.json").write_text(json.dumps({"schema": 1, "runs": []}))
    assert main(["study", "--report", "--out", str(out)]) == 2
    assert "not a study.json of schema 1" in capsys.readouterr().err
    doc = _planted_doc()
    (out / "study.json").write_text(json.dumps(doc))
    assert main(["study", "--report", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    from ditmoe.study_report import render_markdown

    assert printed.strip() == render_markdown(doc).strip() == (out / "report.md").read_text().strip()
    for f in ("loss_curves.png", "fid_vs_flops.png", "fid_vs_time.png"):
        assert (out / f).stat().st_size > 0


# ----------------------------------------------------------------------------- variants
def test_every_default_variant_has_the_base_moe_activated_macs():
    base = base_config()  # the recipe's model
    variants = all_variants(base)  # asserts within 1% itself
    assert [v.name for v in variants] == ["dense", "topk_softmax", "topk_bias", "expert_choice", "token_pool",
                                          "prototype", "race", "no_shared", "e16", "fine_grained", "alpha0"]
    ratios = check_equal_compute(base, variants)
    for v in variants:
        if v.name == "no_shared":
            assert ratios[v.name] < 0.9  # its point: fewer activated MACs (reported)
        else:
            assert abs(ratios[v.name] - 1) <= 0.01, v.name
    cfgs = {v.name: variant_config(base, v) for v in variants}
    assert not cfgs["dense"].is_moe and cfgs["e16"].num_experts == 2 * base.num_experts
    fg = cfgs["fine_grained"]
    assert fg.num_experts * fg.routed_hidden == base.num_experts * base.routed_hidden  # same routed params
    assert fg.top_k * fg.routed_hidden == base.top_k * base.routed_hidden  # same routed MACs
    assert {cfgs[r].router for r in study.ROUTERS_IN_STUDY} == set(study.ROUTERS_IN_STUDY)


def test_unequal_compute_is_refused():
    base = base_config()
    with pytest.raises(AssertionError, match="narrow"):
        check_equal_compute(base, [Variant("narrow", {"expert_hidden": base.routed_hidden // 2})])
    assert compute_stats(base)["macs_per_token"] > 0


def test_bad_input_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "s"
    for argv, words in ((["--variants", "dense,nope"], "unknown study variant(s) nope; known: dense, topk_softmax"),
                        (["--seeds", "0,x"], "comma-separated integers"),
                        (["--seeds", "0,0"], "repeats"),
                        (["--seeds", "-1"], "[0, 2^32)"),
                        (["--steps", "0"], "--steps must be a positive integer"),
                        (["--samples-per-class", "-2"], "--samples-per-class must be a positive integer"),
                        (["--recipe", str(tmp_path / "none.yaml")], "does not exist")):
        assert main(["study", "--out", str(out), *argv]) == 2
        assert words in capsys.readouterr().err
    assert not out.exists()
    assert main(["study", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "fine_grained" in listing and "no_shared" in listing and "MACs/token" in listing
    with pytest.raises(ValueError, match="unknown study variant"):
        study.select_variants("dense,e32", all_variants(base_config()))
    assert [v.name for v in study.select_variants("race,dense", all_variants(base_config()))] == ["dense", "race"]


# ----------------------------------------------------------------------------- the routing analysis, every router
@pytest.mark.parametrize("router", study.ROUTERS_IN_STUDY)
def test_routing_findings_for_every_router(router):
    import torch

    from ditmoe.registry import create_model

    torch.manual_seed(0)
    model = create_model("debug", router=router, learn_sigma=False).eval()
    r = study.routing_findings(model, "flow", {"sampler": "heun", "steps": 2, "cfg_scale": 2.0}, per_class=1)
    assert set(r["mi_excess_bits"]) == {"position", "step", "class"}
    assert len(r["mi_excess_bits_by_layer"]["position"]) == 2 and {"i", "ii", "iii"} <= set(r["findings"])


# ----------------------------------------------------------------------------- smoke, resume, subsets
@pytest.fixture
def tiny_recipe(tmp_path):
    """configs/mnist.yaml with the debug model, a small batch and a 2-step sampler."""
    import yaml

    rec = yaml.safe_load(study.RECIPE_PATH.read_text())
    rec.update(model="debug", global_batch=8, log_every=1, sampler="heun", sample_steps=2, cfg_scale=2.5)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path


def test_study_smoke_and_resume(tmp_path, monkeypatch, tiny_recipe):
    monkeypatch.setenv("DITMOE_CACHE", str(tmp_path / "cache"))
    from ditmoe.eval.mnist_classifier import default_classifier_path, train_mnist_classifier

    train_mnist_classifier(default_classifier_path(), epochs=1, limit=600, eval_limit=200, verbose=False)
    out = tmp_path / "study"
    kw = dict(steps=3, samples_per_class=2, recipe=tiny_recipe, data="digits",
              model_overrides={"input_size": 32, "patch_size": 8}, progress=False)
    trained = []
    real_train = study.train_run

    def counting_train(cfg, overrides):
        summary, model_cfg = real_train(cfg, overrides)
        trained.append((cfg.out, summary["steps_this_run"]))
        return summary, model_cfg

    monkeypatch.setattr(study, "train_run", counting_train)
    doc = study.run_study(out, seeds="0,1", variants="dense,topk_softmax", **kw)
    assert len(trained) == 4 and all(n == 3 for _, n in trained)

    data = json.loads((out / "study.json").read_text())
    assert data == json.loads(json.dumps(doc))
    assert data["schema"] == 1 and data["settings"]["seeds"] == [0, 1]
    assert data["settings"]["sampling"] == {"sampler": "heun", "steps": 2, "cfg_scale": 2.5}  # from the recipe
    assert data["settings"]["train"]["lr"] == 1e-3 and data["settings"]["train"]["lr_decay"] == "cosine"
    assert [(r["variant"], r["seed"]) for r in data["runs"]] == [("dense", 0), ("dense", 1), ("topk_softmax", 0),
                                                                  ("topk_softmax", 1)]
    for r in data["runs"]:
        assert (out / r["variant"] / f"seed{r['seed']}" / "model_ema.safetensors").exists()
        assert math.isfinite(r["fid"]) and r["fid"] >= 0 and 0 <= r["class_agreement"] <= 1
        assert r["curve"]["step"][-1] == 3 and r["final_loss"] > 0 and r["step_seconds"] > 0
        assert r["train_seconds"] == pytest.approx(3 * r["step_seconds"]) and r["train_flops"] > 0
        assert (r["routing"] is None) == (r["variant"] == "dense")
    moe = data["runs"][2]["routing"]
    assert set(moe["mi_excess_bits"]) == {"position", "step", "class"} and "i" in moe["findings"]
    assert set(data["variants"]) == {"dense", "topk_softmax"}
    assert abs(data["variants"]["dense"]["macs_ratio"] - 1) < 0.01
    s = data["summary"]["topk_softmax"]
    assert s["seeds"] == [0, 1] and s["fid"]["n"] == 2 and s["fid"]["min"] <= s["fid"]["mean"] <= s["fid"]["max"]
    assert "routing" in s and "routing" not in data["summary"]["dense"]
    # two seeds: too few to call anything
    assert data["verdicts"]["any_router_beats_dense"]["answer"].startswith("no")
    assert all(c["verdict"] == st.NO_DIFFERENCE for c in data["comparisons"])
    for f in ("loss_curves.png", "fid_vs_flops.png", "fid_vs_time.png"):
        assert (out / f).exists()
    from ditmoe.study_report import render_markdown

    assert (out / "report.md").read_text() == render_markdown(data)

    # A rerun reuses every finished variant/seed: nothing trained, nothing sampled.
    def fail(*a, **k):
        raise AssertionError("a finished run was redone")

    monkeypatch.setattr(study, "train_run", fail)
    monkeypatch.setattr(study, "sample_and_score", fail)
    again = study.run_study(out, seeds="0,1", variants="dense,topk_softmax", **kw)
    assert [r["finished_at"] for r in again["runs"]] == [r["finished_at"] for r in data["runs"]]
    # A subset (--variants / --seeds) of a finished study is served from it as well.
    sub = study.run_study(out, seeds=[1], variants=["topk_softmax"], **kw)
    assert len(sub["runs"]) == 4

    # A run whose training finished but whose results entry is missing (interrupted while sampling):
    # the trainer finds it finished (0 steps), then it is sampled and scored again.
    monkeypatch.setattr(study, "train_run", counting_train)
    monkeypatch.setattr(study, "sample_and_score", _REAL_SAMPLE_AND_SCORE)
    data["runs"] = [r for r in data["runs"] if (r["variant"], r["seed"]) != ("dense", 1)]
    (out / "study.json").write_text(json.dumps(data))
    trained.clear()
    third = study.run_study(out, seeds="0,1", variants="dense,topk_softmax", **kw)
    assert trained == [(str(out / "dense" / "seed1"), 0)]
    assert len(third["runs"]) == 4

    # Other settings in the same folder are refused, naming what differs.
    with pytest.raises(ValueError, match="other settings.*train"):
        study.run_study(out, seeds="0,1", variants="dense", **{**kw, "steps": 4})
