"""Routing analysis: recorder counts, statistics on planted routing, figures and report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ditmoe.analysis import RoutingRecorder, RoutingResults, analyze_counts, make_figures, write_report
from ditmoe.models.routers import Assignment
from ditmoe.analysis.stats import (mi_baseline_analytic, mi_with_baseline, mutual_information,
                                   random_table_same_marginals, spearman)
from tolerances import EPS64, sum_positive_order_tol


# --------------------------------------------------------------------------- fakes
class FakeMoE:
    def __init__(self, num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k
        self.observer = None

    def route(self, idx: torch.Tensor) -> None:
        """What MoE.forward does with the observer: the Assignment of top-k ids (N, T, k) and the
        number of images."""
        if self.observer is not None:
            n, t, k = idx.shape
            w = torch.full((n * t, k), 1.0 / k)
            probs = torch.full((n * t, self.num_experts), 1.0 / self.num_experts)
            self.observer(self, Assignment.top_k(idx.reshape(n * t, k), w, probs), n)


class FakeModel:
    def __init__(self, num_layers=2, num_experts=4, top_k=2, num_classes=10):
        self.num_classes = num_classes
        self.layers = [FakeMoE(num_experts, top_k) for _ in range(num_layers)]

    def moe_layers(self):
        return list(enumerate(self.layers))


def simulate(model: FakeModel, route_fn, num_steps=8, batches=4, n=16, t=16, seed=0, cfg=False):
    """Run a fake sampler: per batch random labels; per step every layer routes route_fn(...)."""
    g = torch.Generator().manual_seed(seed)
    with RoutingRecorder(model, num_steps=num_steps) as rec:
        for _ in range(batches):
            y = torch.randint(0, model.num_classes, (n,), generator=g)
            labels = torch.cat([y, torch.full_like(y, model.num_classes)]) if cfg else y
            rec.set_labels(labels)
            for s in range(num_steps):
                rec.on_step(s, None)
                for li, moe in enumerate(model.layers):
                    moe.route(route_fn(li, s, labels, t, g))
    return rec.results()


def pos_route(li, s, labels, t, g):
    p = torch.arange(t)
    pair = torch.stack([p % 4, (p + 1) % 4], -1)  # (T, 2), a function of position only
    return pair.expand(len(labels), t, 2).clone()


def step_route(li, s, labels, t, g):
    return torch.tensor([s % 4, (s + 1) % 4]).expand(len(labels), t, 2).clone()


def random_route(li, s, labels, t, g):
    return torch.rand(len(labels), t, 4, generator=g).topk(2, dim=-1).indices


def pos_and_step_route(li, s, labels, t, g):
    p = torch.arange(t)
    first = (p % 2).expand(len(labels), t)  # experts {0, 1} by position
    second = torch.full((len(labels), t), 2 + s % 2)  # experts {2, 3} by step
    return torch.stack([first, second], -1)


def class_route(li, s, labels, t, g):
    c = labels % 4
    return torch.stack([c, (c + 1) % 4], -1)[:, None, :].expand(len(labels), t, 2).clone()


# --------------------------------------------------------------------------- estimators
def test_mi_estimators():
    assert mutual_information(np.eye(4) * 10) == pytest.approx(2.0)
    assert mutual_information(np.ones((3, 5))) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    tab = rng.integers(0, 50, size=(20, 6))
    r = random_table_same_marginals(tab, rng)
    assert (r.sum(0) == tab.sum(0)).all() and (r.sum(1) == tab.sum(1)).all()
    # Under independence the permutation baseline and Miller-Madow agree roughly.
    null = mi_with_baseline(rng.multinomial(2000, np.full(40, 1 / 40)).reshape(10, 4), permutations=20, rng=rng)
    assert null["baseline_bits"] == pytest.approx(mi_baseline_analytic(np.ones((10, 4)) * 50), rel=0.5)
    assert spearman([0, 1, 2, 3], [5, 3, 2, 1]) == pytest.approx(-1.0)


# --------------------------------------------------------------------------- planted routing
def test_position_only_routing():
    res = simulate(FakeModel(), pos_route)
    st = analyze_counts(res)
    for lay in st["layers"]:
        mi = lay["mi"]
        # The maximum for top-2 of 4 uniform experts: H(E) - log2 k = 2 - 1 bits.
        assert mi["position"]["mi_bits"] == pytest.approx(1.0, abs=1e-9)
        assert mi["position"]["excess_fraction"] == pytest.approx(1.0, abs=0.01)
        assert abs(mi["class"]["excess_bits"]) < 0.01
        assert mi["step"]["mi_bits"] == pytest.approx(0.0, abs=1e-9)
        assert abs(mi["step"]["excess_bits"]) < 0.01
        assert lay["entropy_norm"] == pytest.approx(1.0) and lay["load_cv"] == pytest.approx(0.0)
    f = st["findings"]["i"]
    assert f["position_dependent"] and not f["step_dependent"] and not f["holds"]


def test_step_only_routing():
    st = analyze_counts(simulate(FakeModel(), step_route))
    for lay in st["layers"]:
        assert lay["mi"]["step"]["mi_bits"] == pytest.approx(1.0, abs=1e-9)
        assert lay["mi"]["step"]["excess_fraction"] == pytest.approx(1.0, abs=0.01)
        assert lay["mi"]["position"]["mi_bits"] == pytest.approx(0.0, abs=1e-9)
        assert abs(lay["mi"]["class"]["excess_bits"]) < 0.01
    f = st["findings"]["i"]
    assert f["step_dependent"] and not f["position_dependent"]


def test_uniform_random_routing():
    st = analyze_counts(simulate(FakeModel(), random_route, batches=8, n=32), permutations=5)
    for lay in st["layers"]:
        for v in ("class", "position", "step"):
            assert abs(lay["mi"][v]["excess_bits"]) < 0.003, (v, lay["mi"][v])
        assert lay["entropy_norm"] > 0.999
        assert lay["load_cv"] < 0.03
        assert lay["load_max_over_mean"] < 1.05
        # Any pair of experts is picked together by about 1/6 of the tokens. Statistical, not
        # rounding: 8 * 32 * 16 * 8 = 32768 independent tokens per layer, standard error
        # sqrt(p (1 - p) / N) <= 0.0028 (p = 1/6 or 1/2), so atol 0.01 is >= 3.6 sigma; the draws
        # come from a seeded generator, so the values are fixed.
        co = np.array(lay["coselect_prob"])
        assert np.allclose(co[~np.eye(4, dtype=bool)], 1 / 6, atol=0.01)
        assert np.allclose(np.diag(co), 0.5, atol=0.01)
    f = st["findings"]
    assert not f["i"]["holds"] and not f["iii"]["holds"]


def test_finding_i_detected_and_rejected_for_class_routing():
    st = analyze_counts(simulate(FakeModel(), pos_and_step_route))
    f = st["findings"]["i"]
    assert f["holds"] and f["layers_holding"] == 2
    assert f["values"]["position_excess_bits"] > 0.45 and f["values"]["step_excess_bits"] > 0.45  # 0.5 bits planted
    st = analyze_counts(simulate(FakeModel(), class_route))
    assert st["layers"][0]["mi"]["class"]["excess_bits"] > 0.9  # 1 bit planted
    assert not st["findings"]["i"]["holds"]


def test_finding_ii_depth_trend():
    def depth_route(li, s, labels, t, g):
        # Layer 0: position-specific; layer 1: half the tokens; layer 2: random.
        p, r = pos_route(li, s, labels, t, g), random_route(li, s, labels, t, g)
        if li == 0:
            return p
        if li == 1:
            keep = torch.rand(len(labels), t, 1, generator=g) < 0.5
            return torch.where(keep, p, r)
        return r

    st = analyze_counts(simulate(FakeModel(num_layers=3), depth_route, batches=6))
    f = st["findings"]["ii"]
    assert f["holds"], f
    assert f["values"]["rho_depth_position_excess"] == pytest.approx(-1.0)

    def reversed_route(li, s, labels, t, g):
        return depth_route(2 - li, s, labels, t, g)

    assert not analyze_counts(simulate(FakeModel(num_layers=3), reversed_route, batches=6))["findings"]["ii"]["holds"]


def test_finding_iii_early_concentration():
    def early_route(li, s, labels, t, g):
        if s < 4:  # first half of 8 steps: always experts 0 and 1
            return torch.tensor([0, 1]).expand(len(labels), t, 2).clone()
        return random_route(li, s, labels, t, g)

    st = analyze_counts(simulate(FakeModel(), early_route, batches=6))
    f = st["findings"]["iii"]
    assert f["holds"], f
    assert f["values"]["first_half_entropy_norm"] == pytest.approx(0.5)
    assert f["values"]["second_half_entropy_norm"] > 0.99
    assert f["values"]["settle_step"] == 4 and f["layers_holding"] == 2

    def late_route(li, s, labels, t, g):
        return early_route(li, 7 - s, labels, t, g)

    assert not analyze_counts(simulate(FakeModel(), late_route, batches=6))["findings"]["iii"]["holds"]


# --------------------------------------------------------------------------- recorder mechanics
def test_recorder_cfg_branches_and_io(tmp_path):
    model = FakeModel(num_classes=10)
    res = simulate(model, random_route, num_steps=3, batches=2, n=5, cfg=True)
    c, t, k = 10, 16, 2
    tok = 2 * 3 * 5 * t  # batches * steps * images * tokens, per branch
    assert (res.tokens == tok).all()
    assert (res.class_expert[:, 0, c] == 0).all() and (res.class_expert[:, 1, :c] == 0).all()
    assert (res.class_expert[:, 1, c].sum(-1) == k * tok).all()
    assert (res.position_expert.sum(-1) == k * 2 * 3 * 5).all()
    assert res.step_position_expert is not None
    np.testing.assert_array_equal(res.step_position_expert.sum(3), res.step_expert)
    # Weights 1/2 per slot (exact in fp32 and float64); float64 sums of halves below 2^53 are
    # exact in any order: bit for bit.
    np.testing.assert_array_equal(res.gate_sum.sum(-1), res.tokens)

    path = res.save(tmp_path / "routing.npz")
    back = RoutingResults.load(path)
    for name in RoutingResults._ARRAYS:
        np.testing.assert_array_equal(getattr(back, name), getattr(res, name))
    assert back.num_classes == c and back.top_k == k
    merged = RoutingResults.merge([res, back])
    np.testing.assert_array_equal(merged.tokens, 2 * res.tokens)
    st = analyze_counts(res, branch="uncond")
    assert st["layers"][0]["mi"]["class"]["mi_bits"] == 0.0  # a single (null) row


def test_recorder_requires_context_and_validates():
    model = FakeModel()
    with RoutingRecorder(model, num_steps=2) as rec:
        with pytest.raises(RuntimeError, match="set_step"):
            model.layers[0].route(torch.zeros(1, 4, 2, dtype=torch.long))
        rec.set_step(0)
        with pytest.raises(RuntimeError, match="set_labels"):
            model.layers[0].route(torch.zeros(1, 4, 2, dtype=torch.long))
        with pytest.raises(ValueError):
            rec.set_step(2)
        with pytest.raises(ValueError):
            rec.set_labels([11])
        rec.set_labels([1, 2])
        with pytest.raises(ValueError, match="labels"):
            model.layers[0].route(torch.zeros(1, 4, 2, dtype=torch.long))
        with pytest.raises(RuntimeError, match="nest"):
            RoutingRecorder(model, num_steps=2).__enter__()
    assert all(m.observer is None for m in model.layers)


# --------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def debug_model():
    import ditmoe

    torch.manual_seed(0)
    model = ditmoe.create_model("debug").eval()
    # Zero-initialised adaLN makes every block an identity at init; randomise so routing varies.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_real_model_counts_match_reference(debug_model):
    model = debug_model
    c = model.num_classes
    moes = model.moe_layers()
    assert len(moes) == 2
    e, k = moes[0][1].num_experts, moes[0][1].top_k
    captured = []  # (slot, step, labels, topk_idx (NT, k), topk_w (NT, k)) straight from the router
    ctx = {}

    def hook(slot):
        def fn(module, inp, out):
            captured.append((slot, ctx["step"], ctx["labels"], out.expert_ids.clone(), out.weights.clone()))
        return fn

    handles = [moe.gate.register_forward_hook(hook(i)) for i, (_, moe) in enumerate(moes)]
    g = torch.Generator().manual_seed(1)
    steps = 3
    try:
        with torch.no_grad(), RoutingRecorder(model, num_steps=steps) as rec:
            for batch in range(2):
                y = torch.randint(0, c, (3,), generator=g)
                labels = torch.cat([y, torch.full_like(y, c)])  # CFG: [cond; uncond]
                rec.set_labels(labels)
                ctx["labels"] = labels
                x = torch.randn(6, 4, 8, 8, generator=g)
                for s in range(steps):
                    rec.set_step(s)
                    ctx["step"] = s
                    model.forward_with_cfg(x, torch.full((6,), 999.0 - 300 * s), labels, cfg_scale=1.5)
                    sizes = [v.numel() for d in rec.count_tensors() for v in d.values() if v is not None]
                    if batch == 0 and s == 0:
                        first_sizes = sizes
                    assert sizes == first_sizes  # bounded: nothing grows with more forwards
    finally:
        for h in handles:
            h.remove()
    assert all(moe.observer is None for _, moe in moes)
    res = rec.results()
    t = res.num_positions
    assert t == 16 and res.num_experts == e and res.top_k == k

    # Slow reference from the router outputs.
    ref = {name: np.zeros(shape) for name, shape in [
        ("step", (2, 2, steps, e)), ("pos", (2, 2, t, e)), ("cls", (2, 2, c + 1, e)),
        ("co", (2, 2, e, e)), ("gate", (2, 2, e)), ("tok", (2, 2))]}
    for slot, s, labels, idx, w in captured:
        idx, w = idx.view(len(labels), t, k), w.view(len(labels), t, k)
        for img in range(len(labels)):
            lab = int(labels[img])
            b = int(lab == c)
            for p in range(t):
                ref["tok"][slot, b] += 1
                ids = [int(v) for v in idx[img, p]]
                for j, ex in enumerate(ids):
                    ref["step"][slot, b, s, ex] += 1
                    ref["pos"][slot, b, p, ex] += 1
                    ref["cls"][slot, b, lab, ex] += 1
                    ref["gate"][slot, b, ex] += float(w[img, p, j])
                    ref["co"][slot, b, ex, ex] += 1
                    for j2, ex2 in enumerate(ids):
                        if j2 != j:
                            ref["co"][slot, b, ex, ex2] += 1
    assert len(captured) == 2 * 2 * steps
    np.testing.assert_array_equal(res.step_expert, ref["step"])
    np.testing.assert_array_equal(res.position_expert, ref["pos"])
    np.testing.assert_array_equal(res.class_expert, ref["cls"])
    np.testing.assert_array_equal(res.coselect, ref["co"])
    np.testing.assert_array_equal(res.tokens, ref["tok"])
    # Both float64 sums of the same fp32 weights (each exact in float64), all positive, perhaps in
    # other orders: within (n - 1) * EPS64 relative for n terms per cell (sum_positive_order_tol).
    n_terms = int(ref["tok"].max()) * k
    np.testing.assert_allclose(res.gate_sum, ref["gate"], rtol=sum_positive_order_tol(n_terms, EPS64), atol=0)
    np.testing.assert_array_equal(res.step_position_expert.sum(2), res.position_expert)
    # Uncond branch: exactly the null-label half of every batch.
    assert (res.tokens[:, 1] == 2 * steps * 3 * t).all()
    assert res.class_expert[:, 1, :c].sum() == 0 and res.class_expert[:, 0, c].sum() == 0


def test_real_model_observers_removed_on_exception(debug_model):
    model = debug_model
    with pytest.raises(KeyError):
        with RoutingRecorder(model, num_steps=1) as rec:
            assert all(moe.observer is not None for _, moe in model.moe_layers())
            rec.set_step(0)
            rec.set_labels(torch.zeros(2, dtype=torch.long))
            with torch.no_grad():
                model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.zeros(2, dtype=torch.long))
            raise KeyError("boom")
    assert all(moe.observer is None for _, moe in model.moe_layers())
    assert rec.results().tokens.sum() == 2 * 2 * 16
    # The model still runs without the recorder.
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.zeros(2, dtype=torch.long))


# --------------------------------------------------------------------------- outputs
def test_figures_and_report(tmp_path):
    def early_pos_route(li, s, labels, t, g):
        return pos_and_step_route(li, s, labels, t, g) if s < 4 else random_route(li, s, labels, t, g)

    res = simulate(FakeModel(num_layers=3), early_pos_route, batches=2)
    st = analyze_counts(res)
    json.dumps(st, allow_nan=False)  # strict JSON
    paths = make_figures(res, st, tmp_path / "fig", dpi=50)
    assert {p.name for p in paths} == {"heatmap_class.png", "heatmap_position.png", "heatmap_step.png",
                                       "spatial_maps.png", "mi_by_layer.png", "entropy_by_step.png"}
    for p in paths:
        assert p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"
    json_path, md_path = write_report(st, tmp_path, figures=paths)
    assert json.loads(json_path.read_text())["num_experts"] == 4
    md = md_path.read_text()
    for heading in ("(i)", "(ii)", "(iii)", "Rule:", "fig/heatmap_class.png"):
        assert heading in md
    assert md.count("**HOLDS**") + md.count("**DOES NOT HOLD**") == 3
    assert "### (i) Expert choice depends on spatial position and time step, hardly on class: **HOLDS**" in md
    assert "nan" not in md.lower().replace("n/a", "")
    assert math.isfinite(st["findings"]["i"]["values"]["position_excess_bits"])
