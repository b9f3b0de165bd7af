"""Routing rules (ditmoe.models.routers): float64 references, planted scores, capacity, batch
independence at inference, the topk_bias balancing, state in checkpoints and resume, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ditmoe
from ditmoe.cli import main
from ditmoe.config import ModelConfig
from ditmoe.models.moe import MoE
from ditmoe.models.routers import (BiasTopKRouter, ExpertChoiceRouter, RaceRouter, build_router,
                                   router_similarity_loss, update_routers)
from tolerances import EPS64, TINY_DIT_CHAIN, TINY_DIT_K, assert_close_fp32, rel_err

ROUTED = ["topk_softmax", "topk_bias", "expert_choice", "race", "token_pool", "prototype"]
NULL = 10  # the null label of make_layer's prototype router (num_classes 10)
DIM, E, K, HIDDEN, SHARED = 8, 4, 2, 12, 16


# --------------------------------------------------------------------------- the float64 reference
def ref_scores(x: torch.Tensor, w: torch.Tensor, score: str) -> list[list[torch.Tensor]]:
    """Per token, per expert: the score, one dot product and one softmax / sigmoid at a time."""
    out = []
    for t in range(x.shape[0]):
        logits = [sum(x[t, d] * w[e, d] for d in range(x.shape[1])) for e in range(w.shape[0])]
        if score == "softmax":
            m = max(float(v.detach()) for v in logits)
            ex = [torch.exp(v - m) for v in logits]
            z = sum(ex)
            out.append([v / z for v in ex])
        else:
            out.append([1 / (1 + torch.exp(-v)) for v in logits])
    return out


def ref_predictor(x: torch.Tensor, predictor) -> list[list[torch.Tensor]]:
    """sigmoid(W2 silu(W1 x + b1) + b2), token by token."""
    w1, b1, w2, b2 = predictor[0].weight, predictor[0].bias, predictor[2].weight, predictor[2].bias
    out = []
    for t in range(x.shape[0]):
        h = w1 @ x[t].detach() + b1
        h = h * torch.sigmoid(h)
        out.append([1 / (1 + torch.exp(-v)) for v in (w2 @ h + b2)])
    return out


def ref_cosines(x: torch.Tensor, protos: torch.Tensor) -> list[list[torch.Tensor]]:
    def unit(v):
        return v / torch.sqrt(sum(c * c for c in v))

    return [[sum(a * b for a, b in zip(unit(x[t]), unit(p))) for p in protos] for t in range(x.shape[0])]


def ref_prototype(x: torch.Tensor, protos: torch.Tensor, labels: list[int], k: int, temperature: float):
    """ProMoE's rule token by token: (pairs, contrastive loss)."""
    cos = ref_cosines(x, protos)
    e_unc = len(protos)
    pairs, first = [], {}
    for t, lab in enumerate(labels):
        if lab == NULL:
            pairs.append((t, e_unc, torch.tensor(1.0, dtype=torch.float64)))
            continue
        chosen = sorted(range(e_unc), key=lambda j: -float(cos[t][j]))[:k]
        pairs += [(t, j, cos[t][j]) for j in chosen]
        first.setdefault(chosen[0], []).append(t)
    used = sorted(first)
    means = [sum(x[t] for t in first[j]) / len(first[j]) for j in used]
    sim = ref_cosines(torch.stack([protos[j] for j in used]), torch.stack(means))  # [i][j]: prototype i, mean j
    loss = 0
    for i in range(len(used)):
        logits = [v / temperature for v in sim[i]]
        m = max(float(v.detach()) for v in logits)
        loss = loss - (logits[i] - m - torch.log(sum(torch.exp(v - m) for v in logits)))
    return pairs, loss / len(used)


def ref_pairs(kind: str, s: list[list[torch.Tensor]], images: int, *, k: int, training: bool,
              bias=None, norm_topk=False, route_scale=1.0, capacity_factor=1.0, threshold=None, predicted=None):
    """(token, expert, weight) triples of each rule, written out with Python sorting."""
    t_all, e = len(s), len(s[0])
    pairs = []
    if kind == "token_pool" and training:  # expert choice over one pool of all tokens
        return ref_pairs("expert_choice", s, 1, k=k, training=True, capacity_factor=capacity_factor)
    if kind == "token_pool" and threshold is not None:
        return [(t, j, s[t][j]) for t in range(t_all) for j in range(e) if float(predicted[t][j]) >= float(threshold[j])]
    if kind == "token_pool":  # inference before any threshold update: top-k per token
        kind, training = "race", False
    if kind in ("topk_softmax", "topk_bias") or (kind == "race" and not training and threshold is None):
        for t in range(t_all):
            key = [float(s[t][j]) + (float(bias[j]) if kind == "topk_bias" else 0.0) for j in range(e)]
            chosen = sorted(range(e), key=lambda j: -key[j])[:k]
            ws = [s[t][j] for j in chosen]
            if norm_topk and k > 1:
                tot = sum(ws)
                ws = [v / (tot + 1e-20) for v in ws]
            pairs += [(t, j, v * route_scale) for j, v in zip(chosen, ws)]
    elif kind == "expert_choice":
        per = t_all // images
        c = max(1, min(per, math.ceil(capacity_factor * per * k / e - 1e-9)))
        for i in range(images):
            for j in range(e):
                toks = sorted(range(i * per, (i + 1) * per), key=lambda t: -float(s[t][j]))[:c]
                pairs += [(t, j, s[t][j]) for t in toks]
    elif kind == "race" and training:
        allp = sorted(((t, j) for t in range(t_all) for j in range(e)), key=lambda p: -float(s[p[0]][p[1]]))
        pairs = [(t, j, s[t][j]) for t, j in allp[:t_all * k]]
    else:  # race at inference
        pairs = [(t, j, s[t][j]) for t in range(t_all) for j in range(e) if float(s[t][j]) >= threshold]
    return pairs


def ref_swiglu(x, w_in, w_out, hidden):
    h = x @ w_in
    return (F.silu(h[:hidden]) * h[hidden:]) @ w_out


def ref_moe(layer: MoE, x: torch.Tensor, pairs) -> torch.Tensor:
    """y[t] = sum over t's pairs of w * expert_e(x_t) + shared(x_t), token by token in float64."""
    n, t, d = x.shape
    flat = x.reshape(n * t, d)
    ex, sh = layer.experts, layer.shared_experts
    rows = []
    for tok in range(n * t):
        y = flat.new_zeros(d)
        for p_t, e, w in pairs:
            if p_t == tok:
                y = y + w * ref_swiglu(flat[tok], ex.w_in[e], ex.w_out[e], ex.hidden)
        y = y + F.linear(F.silu(F.linear(flat[tok], sh.gate_proj.weight)) * F.linear(flat[tok], sh.up_proj.weight),
                         sh.down_proj.weight)
        rows.append(y)
    return torch.stack(rows).view(n, t, d)


def make_layer(kind: str, seed: int = 0, **knobs) -> MoE:
    torch.manual_seed(seed)
    router = build_router(kind, DIM, E, K, **knobs)
    return MoE(DIM, E, K, HIDDEN, SHARED, router=router).double()


def router_knobs(kind: str) -> dict:
    return {"topk_bias": {"norm_topk": True, "route_scale": 2.5}, "expert_choice": {"capacity_factor": 1.5},
            "token_pool": {"capacity_factor": 0.7}, "prototype": {"num_classes": NULL, "contrastive_temperature": 0.5}
            }.get(kind, {})


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", ROUTED)
def test_rule_matches_float64_reference(kind, training):
    """Selected pairs, gate weights, outputs and the gradients of inputs, router and experts."""
    knobs = router_knobs(kind)
    layer = make_layer(kind, **knobs)
    gate = layer.gate
    if kind == "topk_bias":
        gate.bias.copy_(torch.tensor([0.05, -0.02, 0.01, -0.04]))
    if kind == "race" and not training:
        gate.threshold.fill_(0.5)
        gate.threshold_updates.fill_(1)
    if kind == "token_pool" and not training:
        gate.thresholds.copy_(torch.tensor([0.3, 0.5, 0.45, 0.6]))
        gate.threshold_updates.fill_(1)
    layer.train(training)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, DIM, generator=g, dtype=torch.float64)
    x_ref = x.clone().requires_grad_(True)
    x = x.requires_grad_(True)
    labels = torch.tensor([1, NULL, 3])  # image 1 is unconditional
    cond = labels if kind == "prototype" else None
    a = gate.route(x, cond)
    y = layer(x, cond)
    score = {"topk_softmax": "softmax", "expert_choice": "softmax", "token_pool": "softmax"}.get(kind, "sigmoid")
    s = ref_scores(x_ref.reshape(-1, DIM), gate.weight, score)
    pairs = [] if kind == "prototype" else ref_pairs(kind, s, 3, k=K, training=training, bias=getattr(gate, "bias", None),
                      norm_topk=knobs.get("norm_topk", False), route_scale=knobs.get("route_scale", 1.0),
                      capacity_factor=knobs.get("capacity_factor", 1.0),
                      threshold={"race": 0.5, "token_pool": gate.thresholds if kind == "token_pool" else None}.get(kind)
                      if not training else None,
                      predicted=ref_predictor(x_ref.reshape(-1, DIM), gate.predictor) if kind == "token_pool" else None)
    if kind == "prototype":
        pairs, contrastive = ref_prototype(x_ref.reshape(-1, DIM), gate.prototypes, labels.repeat_interleave(6).tolist(),
                                           K, 0.5)
        if training:  # the routing contrastive loss and its gradients (prototypes and tokens)
            assert rel_err(a.extra_loss, contrastive) <= 64 * EPS64 * DIM
            for got_g, want_g in zip(torch.autograd.grad(a.extra_loss, [x, gate.prototypes]),
                                     torch.autograd.grad(contrastive, [x_ref, gate.prototypes])):
                assert rel_err(got_g, want_g) <= 64 * EPS64 * DIM
        else:
            assert a.extra_loss is None
        assert set(a.token[a.expert == E - 1].tolist()) == set(range(6, 12))  # the null image's tokens, alone
    got = sorted(zip(a.token.tolist(), a.expert.tolist(), a.weight.tolist()))
    want = sorted((t, e, float(w)) for t, e, w in pairs)
    assert [(t, e) for t, e, _ in got] == [(t, e) for t, e, _ in want]
    tol = 64 * EPS64 * math.sqrt(HIDDEN)
    assert np.allclose([w for *_, w in got], [w for *_, w in want], rtol=tol, atol=0)
    y_ref = ref_moe(layer, x_ref, pairs)
    assert rel_err(y, y_ref) <= tol
    cot = torch.randn(y.shape, generator=g, dtype=torch.float64)
    params = [gate.weight if kind != "prototype" else gate.prototypes, layer.experts.w_in, layer.experts.w_out]
    grads = torch.autograd.grad((y * cot).sum(), [x] + params)
    grads_ref = torch.autograd.grad((y_ref * cot).sum(), [x_ref] + params, allow_unused=True)
    for name, gg, gr in zip(["x", "router", "w_in", "w_out"], grads, grads_ref):
        gr = torch.zeros_like(gg) if gr is None else gr
        assert rel_err(gg, gr) <= tol or (gr.abs().max() == 0 and gg.abs().max() == 0), name
    if kind == "token_pool" and training:  # the predictor's BCE against the selection mask
        chosen = {(t, e) for t, e, _ in want}
        prob = ref_predictor(x_ref.reshape(-1, DIM), gate.predictor)
        bce = -sum(torch.log(prob[t][e]) if (t, e) in chosen else torch.log(1 - prob[t][e])
                   for t in range(len(prob)) for e in range(E)) / (len(prob) * E)
        assert rel_err(a.extra_loss, bce) <= tol and rel_err(gate.balance_loss(a), bce) <= tol
        assert a.extra_loss.grad_fn is not None and torch.autograd.grad(
            a.extra_loss, gate.weight, allow_unused=True)[0] is None  # the loss reaches the predictor only


# --------------------------------------------------------------------------- planted scores
def planted(kind: str, logits_per_expert: torch.Tensor, **knobs):
    """A router whose logits are set by hand: x = one-hot rows of `logits_per_expert` (T, E),
    router weight the identity (D = E)."""
    r = build_router(kind, E, E, K, **knobs)
    with torch.no_grad():
        r.weight.copy_(torch.eye(E))
    return r, logits_per_expert.float()


def test_planted_topk_bias_selects_by_bias_weights_by_score():
    r, x = planted("topk_bias", torch.zeros(5, E))  # every score sigmoid(0) = 0.5
    r.bias.copy_(torch.tensor([0.0, 0.3, 0.2, -0.5]))
    a = r(x)
    assert a.expert_ids.sort(1).values.tolist() == [[1, 2]] * 5
    assert torch.equal(a.weights, torch.full((5, 2), 0.5))  # unbiased scores, not score + bias


def test_planted_expert_choice_takes_each_experts_best_tokens_per_image():
    # 2 images of 4 tokens; expert 0 prefers late tokens, expert 1 early ones, 2 and 3 never win.
    ramp = torch.tensor([0.0, 1.0, 2.0, 3.0])
    row = torch.stack([ramp, -ramp, torch.full((4,), -9.0), torch.full((4,), -9.0)], 1)
    r, x = planted("expert_choice", torch.cat([row, row]), capacity_factor=1.0)
    r.top_k = 1  # C = ceil(1 * 4 * 1 / 4) = 1 token per expert and image
    a = r.route(x.view(2, 4, E))
    got = sorted(zip(a.token.tolist(), a.expert.tolist()))
    # per image: expert 0 -> token 3, expert 1 -> token 0, expert 2/3 -> the token least bad for them
    assert (3, 0) in got and (0, 1) in got and (7, 0) in got and (4, 1) in got
    assert len(got) == 2 * E * 1


def test_planted_race_gives_a_hard_token_many_experts_and_easy_ones_none():
    x = torch.full((4, E), -5.0)
    x[0] = 5.0  # token 0 scores high on every expert
    r, x = planted("race", x)
    r.train()
    a = r(x)  # K = 4 tokens * 2 = 8 pairs: token 0's 4, then 4 of the -5 ties
    assert sorted(e for t, e in zip(a.token.tolist(), a.expert.tolist()) if t == 0) == [0, 1, 2, 3]
    assert a.token.numel() == 8


def ref_similarity_loss(probs: torch.Tensor, selected: torch.Tensor) -> float:
    """The router-similarity loss written out pair by pair in float64: F_ij = how often experts i
    and j were chosen for the same token, scaled to mean 1 over the diagonal and over the rest;
    Q_ij = mean over tokens of p_i p_j; L = sum F_ij Q_ij / E."""
    p, m = probs.double().tolist(), selected.double().tolist()
    t, e = len(p), len(p[0])
    co = [[sum(m[n][i] * m[n][j] for n in range(t)) for j in range(e)] for i in range(e)]
    diag = sum(co[i][i] for i in range(e))
    off = sum(co[i][j] for i in range(e) for j in range(e) if i != j)
    total = 0.0
    for i in range(e):
        for j in range(e):
            f = co[i][j] * e / diag if i == j else co[i][j] * (e * e - e) / off
            total += f * sum(p[n][i] * p[n][j] for n in range(t)) / t
    return total / e


def test_router_similarity_loss_matches_float64_reference_and_its_closed_form():
    g = torch.Generator().manual_seed(3)
    probs = torch.randn(12, 5, generator=g, dtype=torch.float64).softmax(-1)
    selected = (torch.rand(12, 5, generator=g, dtype=torch.float64) < 0.4).double()
    assert abs(float(router_similarity_loss(probs, selected)) - ref_similarity_loss(probs, selected)) < 1e-12
    # uniform probabilities, every pair equally often chosen (every token takes every expert): 1/E
    for e in (2, 4, 8):
        uniform = router_similarity_loss(torch.full((6, e), 1.0 / e, dtype=torch.float64),
                                         torch.ones(6, e, dtype=torch.float64))
        assert abs(float(uniform) - 1.0 / e) < 1e-12


def test_router_similarity_loss_pushes_apart_experts_that_are_always_chosen_together():
    # experts 0 and 1 are chosen together for every token, 2 and 3 never together
    logits = torch.zeros(8, 4, dtype=torch.float64, requires_grad=True)
    selected = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 4 + [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]] * 2,
                            dtype=torch.float64)
    router_similarity_loss(logits.softmax(-1), selected).backward()
    # descending the loss lowers p_0 p_1 on the tokens where 0 and 1 ran together: their logits move
    # apart or down relative to the experts seldom chosen with another
    g = logits.grad[:4]
    assert (g[:, 0] > g[:, 2]).all() and (g[:, 1] > g[:, 3]).all()


def test_race_similarity_loss_is_added_to_the_aux_loss_with_its_weight():
    x = torch.randn(2, 6, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    plain = make_layer("race").train()
    weighted = make_layer("race", similarity_weight=0.5).train()
    weighted.load_state_dict(plain.state_dict())
    _, aux_plain = plain(x, return_aux=True)
    _, aux = weighted(x, return_aux=True)
    r = weighted.gate
    logits = x.reshape(-1, DIM) @ r.weight.t()
    s = torch.sigmoid(logits).reshape(-1)
    chosen = torch.topk(s, k=12 * r.top_k).indices
    selected = torch.zeros(12 * E, dtype=torch.float64).index_fill_(0, chosen, 1.0).view(12, E)
    want = 0.5 * ref_similarity_loss(logits.softmax(-1), selected)
    assert abs(float((aux - aux_plain).detach()) - want) < 1e-12
    assert abs(r.statistics()["similarity_loss"] - want) < 1e-12
    weighted.eval()
    assert weighted(x, return_aux=True)[1] == 0  # no training selection at inference: no loss


def test_prototype_sends_every_null_class_token_to_the_unconditional_expert():
    torch.manual_seed(0)
    model = ditmoe.create_model("debug", router="prototype", top_k=1, class_dropout_prob=0.5)
    seen = []
    for _, moe in model.moe_layers():
        moe.observer = lambda moe, a, n: seen.append((a, n))
    x, t = torch.randn(6, 4, 8, 8), torch.rand(6) * 999
    model.eval()
    model(x, t, torch.tensor([3, 10, 10, 5, 10, 0]))  # a CFG-style batch: 3 null images
    for a, n in seen:
        per_image_unc = [set(a.expert[a.token // 16 == i].tolist()) == {E - 1} for i in range(n)]
        assert per_image_unc == [False, True, True, False, True, False]
        assert torch.equal(a.weight[a.expert == E - 1], torch.ones(int((a.expert == E - 1).sum())))
        assert int((a.expert == E - 1).sum()) == 3 * 16  # one pair per null token, none for the others
    seen.clear()
    model.train()  # label dropout: the dropped images' tokens go to the unconditional expert
    model(x, t, torch.tensor([3, 1, 2, 5, 7, 0]))
    for a, n in seen:
        unc = [set(a.expert[a.token // 16 == i].tolist()) == {E - 1} for i in range(n)]
        cond = [E - 1 not in a.expert[a.token // 16 == i].tolist() for i in range(n)]
        assert all(u != c for u, c in zip(unc, cond)) and any(unc)  # each image all one or all the other
    assert [u for u in unc] == [set(seen[0][0].expert[seen[0][0].token // 16 == i].tolist()) == {E - 1}
                                for i in range(6)]  # the same images in every layer


@pytest.mark.parametrize("cf,per,k,want", [(1.0, 16, 2, 8), (1.3, 16, 2, 11), (0.1, 16, 1, 1), (10.0, 16, 2, 16)])
def test_expert_choice_capacity_is_exact(cf, per, k, want):
    r = ExpertChoiceRouter(DIM, E, k, capacity_factor=cf)
    assert r.capacity(per) == want  # ceil(cf * S * k / E), within [1, S]
    x = torch.randn(3, per, DIM)
    a = r.route(x)
    image = a.token // per
    for i in range(3):
        for e in range(E):
            assert int(((image == i) & (a.expert == e)).sum()) == want


@pytest.mark.parametrize("cf,pool,want", [(1.0, 48, 24), (0.7, 48, 17), (100.0, 48, 48)])
def test_token_pool_capacity_is_exact_over_the_pool(cf, pool, want):
    from ditmoe.models.routers import TokenPoolRouter

    r = TokenPoolRouter(DIM, E, K, capacity_factor=cf).train()
    assert r.capacity(pool) == want  # ceil(cf * pool * k / E), within [1, pool]
    a = r.route(torch.randn(3, pool // 3, DIM))  # the pool is all 3 images' tokens
    assert torch.bincount(a.expert, minlength=E).tolist() == [want] * E


def test_token_pool_predictor_learns_a_planted_selection_mask():
    """Router weights set by hand (expert e scores 3 * x_e); the predictor, trained by its BCE
    alone on fresh pools, then predicts the selection of held-out tokens with >= 90% accuracy
    (chance, predicting "never selected", is 50%: each expert takes half the pool)."""
    from ditmoe.models.routers import TokenPoolRouter

    torch.manual_seed(0)
    dim = 16
    r = TokenPoolRouter(dim, E, K, capacity_factor=1.0).train()
    with torch.no_grad():
        r.weight.zero_()
        r.weight[:, :E] = 3 * torch.eye(E)
    opt = torch.optim.Adam(r.predictor.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        a = r(torch.randn(256, dim, generator=g))
        opt.zero_grad()
        a.extra_loss.backward()
        opt.step()
    x = torch.randn(1024, dim, generator=g)
    a = r(x)
    mask = torch.zeros(1024, E, dtype=torch.bool)
    mask[a.token, a.expert] = True
    acc = float(((r.predict(x) > 0) == mask).float().mean())
    assert acc >= 0.9, acc


# --------------------------------------------------------------------------- inference: no batch dependence
@pytest.mark.parametrize("kind", ROUTED)
def test_inference_image_alone_equals_image_in_batch(kind):
    torch.manual_seed(0)
    model = ditmoe.create_model("debug", router=kind, top_k=1 if kind == "prototype" else 2)
    x, t, y = torch.randn(5, 4, 8, 8), torch.rand(5) * 999, torch.tensor([0, 3, 5, 9, 2])
    model.train()
    model(x, t, y)  # one training forward so race has a cut-off, topk_bias a load
    update_routers(model)
    with torch.no_grad():  # a model that does something: non-zero adaLN and output layers
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    model.eval()
    with torch.no_grad():
        full = model(x, t, y)
        for i in range(5):
            alone = model(x[i:i + 1], t[i:i + 1], y[i:i + 1])
            assert_close_fp32(alone[0], full[i], TINY_DIT_K, TINY_DIT_CHAIN, f"{kind} image {i}")


# --------------------------------------------------------------------------- topk_bias balancing
def test_topk_bias_evens_out_a_planted_skewed_load_within_15_steps():
    """Scores favour expert 0 > 1 > 2 > 3 by 0.4 in the logits (top-2 alone leaves expert 3 almost
    idle); with u = 0.01 the bias needs about 0.4 * 0.25 / 0.01 = 10 steps to offset the gaps. From
    step 15 on every step's largest load is within 40% of the mean (512 pairs a step: sampling noise
    alone is about 10%), and the load summed over steps 15 to 60 within 10% of the mean."""
    torch.manual_seed(0)
    r = BiasTopKRouter(E + 1, E, K, norm_topk=False, update_rate=0.01)
    with torch.no_grad():
        r.weight.zero_()
        r.weight[:, :E] = torch.eye(E) * 0.3  # per-token variation
        r.weight[:, E] = torch.tensor([1.2, 0.8, 0.4, 0.0])  # the planted skew, on a constant feature
    r.train()
    g = torch.Generator().manual_seed(3)

    def load():
        x = torch.cat([torch.randn(256, E, generator=g), torch.ones(256, 1)], 1)
        return torch.bincount(r(x).expert, minlength=E).double()

    first = load()
    assert first[0] >= 1.9 * first.mean() and first[3] <= 0.1 * first.mean()  # skewed before any update
    r.pending.zero_()
    total = torch.zeros(E, dtype=torch.float64)
    for step in range(60):
        now = load()
        update_routers(r)
        if step >= 15:
            assert float(now.max() / now.mean()) <= 1.4, (step, now)
            total += now
    assert float(total.max() / total.mean()) <= 1.1 and float(total.min() / total.mean()) >= 0.9, total
    assert abs(float(r.bias.sum())) < 1e-5  # centred


def test_topk_bias_counts_every_micro_batch_and_the_sum_over_processes():
    r = BiasTopKRouter(DIM, E, K, norm_topk=False, update_rate=0.1)
    r.train()
    for _ in range(3):
        r(torch.randn(10, DIM))
    assert float(r.pending.sum()) == 3 * 10 * K
    seen = {}

    def reduce(t):  # as two processes, the other with all its load on expert 3
        seen["in"] = t.clone()
        return t + torch.tensor([0.0, 0.0, 0.0, 1000.0], dtype=t.dtype)

    update_routers(r, reduce)
    assert float(seen["in"].sum()) == 60 and float(r.pending.sum()) == 0
    assert int(r.bias.argmin()) == 3  # the global overload lowers expert 3's bias
    r.eval()
    r(torch.randn(10, DIM))
    assert float(r.pending.sum()) == 0  # inference counts nothing


# --------------------------------------------------------------------------- config and errors
def test_config_defaults_and_old_configs():
    cfg = ModelConfig.from_dict({k: v for k, v in ditmoe.get_config("debug").to_dict().items()
                                 if k not in ("router", "capacity_factor", "router_score")})
    assert cfg.router == "topk_softmax" and cfg.balance_alpha == 0.01
    assert ditmoe.get_config("debug", router="topk_bias").balance_alpha == 0.0
    assert ditmoe.get_config("debug", router="race", aux_alpha=0.02).balance_alpha == 0.02
    m = ditmoe.create_model("debug", router="expert_choice")
    assert isinstance(m.blocks[0].moe.gate, ExpertChoiceRouter)


@pytest.mark.parametrize("override,message", [
    ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"capacity_factor": -1.0}, "capacity_factor"),
    ({"top_k": 5}, "top_k 5 must be between 1 and num_experts 4"),
    ({"router": "top2"}, "router 'top2' is not"),
    ({"router_score": "sigmoid"}, "topk_softmax scores by softmax"),
    ({"threshold_decay": 1.0}, "threshold_decay"),
    ({"bias_update_rate": -0.1}, "bias_update_rate"),
    ({"router": "prototype", "class_dropout_prob": 0.0}, "prototype needs a null class"),
    ({"router": "prototype", "top_k": 4}, "top_k 4 must be between 1 and num_experts - 1 = 3"),
    ({"router": "prototype", "contrastive_temperature": 0.0}, "contrastive_temperature"),
    ({"router": "race", "similarity_weight": -1.0}, "similarity_weight must be >= 0"),
    ({"router": "race", "similarity_weight": float("nan")}, "similarity_weight must be >= 0"),
    ({"router": "topk_bias", "similarity_weight": 0.1}, "similarity_weight is the race router's loss"),
])
def test_bad_router_settings_are_clear_errors(override, message):
    with pytest.raises(ValueError, match=message):
        ditmoe.get_config("debug", **override)


def test_router_flag_lists_its_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--model-router" in out and "expert_choice" in out and "--model-capacity-factor" in out


# --------------------------------------------------------------------------- state, resume, CLI
def test_state_buffers_survive_save_and_load(tmp_path):
    for kind, names in (("topk_bias", ["bias"]), ("race", ["threshold", "threshold_updates"]),
                        ("token_pool", ["thresholds", "threshold_updates"])):
        m = ditmoe.create_model("debug", router=kind)
        gate = m.blocks[1].moe.gate
        for n in names:
            getattr(gate, n).fill_(3)
        assert "pending" not in " ".join(m.state_dict())  # accumulators stay out of checkpoints
        assert all(n not in dict(m.named_parameters()) for n in names)  # never seen by the optimizer
        torch.save(m.state_dict(), tmp_path / f"{kind}.pt")
        m2 = ditmoe.create_model("debug", router=kind)
        m2.load_state_dict(torch.load(tmp_path / f"{kind}.pt", weights_only=True))
        for n in names:
            assert torch.equal(getattr(m2.blocks[1].moe.gate, n), getattr(gate, n))
    # A checkpoint of another router lacks the state: loading says which keys.
    with pytest.raises(RuntimeError, match="threshold"):
        ditmoe.create_model("debug", router="race").load_state_dict(ditmoe.create_model("debug").state_dict())


@pytest.mark.parametrize("kind,fmt", [("topk_bias", "file"), ("race", "file"), ("token_pool", "file"),
                                      ("race", "sharded")])
def test_resume_is_exact_with_router_state(tmp_path, kind, fmt):
    from test_train import tiny_trainer

    over = {"router": kind, "bias_update_rate": 0.01}
    straight = tiny_trainer(tmp_path / "a", overrides=over, micro_batch=8)  # 2 micro-batches per step
    straight.run()
    first = tiny_trainer(tmp_path / "b", overrides=over, micro_batch=8, steps=2, checkpoint_format=fmt)
    first.run()
    written = sorted((tmp_path / "b" / "run" / "checkpoints").iterdir())
    assert written and all(p.name.endswith(".dcp" if fmt == "sharded" else ".pt") for p in written), written
    resumed = tiny_trainer(tmp_path / "b", overrides=over, micro_batch=8, steps=4, resume="auto",
                           checkpoint_format=fmt)
    resumed.run()
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    for (k, a), (_, b) in zip(straight.ema.state_dict().items(), resumed.ema.state_dict().items()):
        assert torch.equal(a, b), k
    gate, ema_gate = straight.model.blocks[0].moe.gate, straight.ema.model.blocks[0].moe.gate
    if kind == "topk_bias":
        assert float(gate.bias.abs().max()) > 0  # it moved
        assert torch.equal(ema_gate.bias, gate.bias)  # copied into the EMA model, not averaged
    elif kind == "race":
        assert int(gate.threshold_updates) == 4 and 0 < float(gate.threshold) < 1
        assert torch.equal(ema_gate.threshold, gate.threshold)
    else:
        assert int(gate.threshold_updates) == 4 and 0 < float(gate.thresholds.min()) < 1
        assert torch.equal(ema_gate.thresholds, gate.thresholds)


@pytest.mark.parametrize("kind", ["topk_bias", "expert_choice", "race", "token_pool", "prototype"])
def test_cli_train_sample_analyze_per_router(tmp_path, kind):
    out = tmp_path / "run"
    assert main(["train", "--model", "debug", "--model-input-size", "8", "--data", "digits", "--steps", "2",
                 "--global-batch", "8", "--log-every", "1", "--out", str(out), "--progress", "false",
                 "--logger", "csv", "--model-router", kind]) == 0
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "unrouted_fraction" in header
    assert {"topk_bias": "router_bias_spread", "race": "router_threshold", "token_pool": "router_predictor_bce",
            "prototype": "router_contrastive_loss"}.get(kind, "unrouted_fraction") in header
    assert json.loads((out / "config.json").read_text())["model"]["router"] == kind
    assert main(["sample", "--ckpt", str(out / "model_ema.safetensors"), "--out", str(tmp_path / "s"),
                 "--classes", "1,2", "--per-class", "1", "--steps", "2", "--no-progress"]) == 0
    assert main(["analyze", "--ckpt", str(out / "model_ema.safetensors"), "--out", str(tmp_path / "a"),
                 "--per-class", "1", "--steps", "2", "--cfg-scale", "2.0", "--no-progress"]) == 0
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    counts = np.load(tmp_path / "a" / "routing_counts.npz")
    assert counts["tokens"].tolist() == [[10 * 16 * 2] * 2] * 2
    for lay in stats["layers"]:
        assert lay["pairs_per_token"] > 0 and lay["unrouted_fraction"] is not None


# --------------------------------------------------------------------------- speed layers, accounting
@pytest.mark.parametrize("kind", ROUTED)
def test_speed_layers_give_the_reference_result(kind):
    """kernels.apply keeps every router: top-k assignments take the fast slot-major plan, the
    variable-pair ones (expert_choice, race in training, ...) the same plan in slot order."""
    import copy

    from ditmoe import kernels

    torch.manual_seed(0)
    ref = MoE(DIM, E, K, HIDDEN, SHARED, router=build_router(kind, DIM, E, K)).train()
    fast = kernels.apply(copy.deepcopy(ref))
    x = torch.randn(3, 8, DIM)
    outs, grads = [], []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad, layer.gate.weight.grad, layer.experts.w_in.grad])
    assert_close_fp32(outs[1], outs[0], 2 * HIDDEN, 4, f"{kind} out")
    for a, b in zip(grads[1], grads[0]):
        assert_close_fp32(a, b, 2 * HIDDEN, 8, f"{kind} grad")


def test_activated_compute_follows_the_router():
    from ditmoe.accounting import experts_per_token, model_stats

    base = ditmoe.get_config("DiT-MoE-S/2-8E2A")
    ec = base.replace(router="expert_choice", capacity_factor=1.5)
    k, note = experts_per_token(ec, 256)
    assert k == 96 * 8 / 256 == 3.0  # C = ceil(1.5 * 256 * 2 / 8) = 96 tokens per expert
    assert "96 tokens per expert" in note
    s0, s1 = model_stats(base), model_stats(ec)
    assert s1.activated_params > s0.activated_params and s1.gmacs > s0.gmacs and s1.experts_per_token == 3.0
    assert "threshold" in experts_per_token(base.replace(router="race"), 256)[1]
    from ditmoe.plan import activation_bytes_per_token, pairs_per_token

    assert pairs_per_token(ec) == 3.0 and pairs_per_token(base) == 2.0  # ditmoe plan counts the same pairs
    assert activation_bytes_per_token(ec)["moe"] > activation_bytes_per_token(base)["moe"]


def test_init_from_another_router_starts_its_state_fresh_or_says_which_router(tmp_path):
    from test_train import tiny_trainer

    tiny_trainer(tmp_path / "a", steps=1).run()  # topk_softmax
    src = str(tmp_path / "a" / "run" / "model_ema.safetensors")
    race = tiny_trainer(tmp_path / "b", overrides={"router": "race"}, steps=1, init_from=src)
    assert int(race.model.blocks[0].moe.gate.threshold_updates) == 0  # fresh, not missing
    assert any("starts fresh" in line for line in race.init_report.lines)
    race.run()
    assert int(race.model.blocks[0].moe.gate.threshold_updates) == 1
    with pytest.raises(ValueError, match="give --model-router topk_softmax"):
        tiny_trainer(tmp_path / "c", overrides={"router": "prototype"}, steps=1, init_from=src)


def test_recorder_counts_tokens_with_zero_or_many_experts():
    """A hand-made assignment of 2 images x 2 tokens: token 0 no expert, token 1 three, token 2
    one, token 3 two; image 1 is unconditional."""
    from ditmoe.analysis import RoutingRecorder, analyze_counts
    from ditmoe.models.routers import Assignment

    class Layer:
        num_experts, top_k, observer = E, K, None

    class Model:
        num_classes = 10
        layer = Layer()

        def moe_layers(self):
            return [(0, self.layer)]

    model = Model()
    token = torch.tensor([1, 1, 1, 2, 3, 3])
    expert = torch.tensor([0, 1, 3, 2, 0, 1])
    weight = torch.tensor([0.5, 0.25, 0.25, 1.0, 0.75, 0.25])
    a = Assignment(token, expert, weight, torch.full((4, E), 1.0 / E))
    with RoutingRecorder(model, num_steps=1) as rec:
        rec.set_labels(torch.tensor([3, 10]))
        rec.set_step(0)
        model.layer.observer(model.layer, a, 2)
    res = rec.results()
    assert res.tokens.tolist() == [[2, 2]] and res.unrouted.tolist() == [[1, 0]]
    assert res.position_expert[0, 0].tolist() == [[0, 0, 0, 0], [1, 1, 0, 1]]  # cond image: tokens 0, 1
    assert res.position_expert[0, 1].tolist() == [[0, 0, 1, 0], [1, 1, 0, 0]]  # uncond image: tokens 2, 3
    co = res.coselect[0, 0]
    assert co[0, 1] == co[1, 3] == co[0, 3] == 1 and co.diagonal().tolist() == [1, 1, 0, 1]
    assert res.gate_sum[0, 1].tolist() == [0.75, 0.25, 1.0, 0.0]
    lay = analyze_counts(res, branch="cond", permutations=0)["layers"][0]
    assert lay["pairs_per_token"] == 1.5 and lay["unrouted_fraction"] == 0.5


@pytest.mark.parametrize("kind", ["topk_bias", "race", "token_pool"])
def test_router_state_is_the_same_with_gradient_checkpointing(tmp_path, kind):
    """The recomputed forwards of activation checkpointing count the load / cut-offs twice; the
    updates use only signs and means, so the state is that of the plain run."""
    from test_train import tiny_trainer

    runs = []
    for ckpt in (False, True):
        tr = tiny_trainer(tmp_path / str(ckpt), overrides={"router": kind, "bias_update_rate": 0.01}, steps=2,
                          grad_checkpointing=ckpt, ckpt_every=0)
        tr.run()
        runs.append({k: v for k, v in tr.model.state_dict().items() if k.endswith(("gate.bias", "threshold",
                                                                                   "thresholds"))})
    assert runs[0]
    for k, v in runs[0].items():
        assert_close_fp32(runs[1][k], v, TINY_DIT_K, 2 * TINY_DIT_CHAIN, k)


def test_official_export_refuses_other_routers():
    from ditmoe.convert import export_official

    assert export_official(ditmoe.create_model("debug"))  # topk_softmax: the official layout
    with pytest.raises(ValueError, match="only the top-k softmax router"):
        export_official(ditmoe.create_model("debug", router="race"))


def test_fine_grained_registry_model_routes_with_every_rule():
    cfg = ditmoe.get_config("DSMoE-L/2-E48")
    assert (cfg.num_experts, cfg.top_k, cfg.routed_hidden, cfg.shared_width, cfg.router) == (48, 5, 448, 448, "topk_bias")
    from ditmoe.accounting import model_stats

    assert 0.40e9 < model_stats(cfg).activated_params < 0.47e9  # the paper reports 436M activated
    # The same narrow experts at a test size under every rule: 12 experts of width 24, k = 3.
    for kind in ROUTED:
        m = ditmoe.create_model("debug", num_experts=12, top_k=3, expert_hidden=24, shared_hidden=24, router=kind)
        out, aux = m(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10]), return_aux=True)
        (out.square().mean() + aux.sum()).backward()


def test_token_pool_capacity_warmup_decays_linearly_from_every_token():
    from ditmoe.models.routers import TokenPoolRouter

    r = TokenPoolRouter(DIM, E, 1, capacity_factor=1.0, capacity_warmup_steps=4).train()
    seen = []
    for _ in range(6):
        a = r.route(torch.randn(2, 24, DIM))  # a pool of 48 tokens
        seen.append(int(torch.bincount(a.expert, minlength=E)[0]))
        update_routers(r)
    # capacity factor E = 4 (all 48 tokens), 3.25, 2.5, 1.75, then 1 (ceil(1 * 48 / 4) = 12)
    assert seen == [48, 39, 30, 21, 12, 12]
    assert ditmoe.get_config("debug", router="token_pool", capacity_warmup_steps=10).capacity_warmup_steps == 10
    with pytest.raises(ValueError, match="capacity_warmup_steps"):
        ditmoe.get_config("debug", capacity_warmup_steps=-1)
