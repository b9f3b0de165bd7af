"""Expert parallelism on 2 and 4 CPU processes (gloo) against the single-process model.

One spawn per world size runs (a) the bare layer test: `apply_expert_parallel` on a model, each
rank its own inputs, forward and backward, once with the model's own routing and once with a
planted routing that leaves some experts, and all of one rank's experts, without tokens; and
(b) the trainer with `parallel="ep"` / `"ep_fsdp"` for 2 steps. The tests then compare, in this
process, with the single-process model: outputs, balance losses, every gradient (dense gradients
summed over ranks, each rank's expert gradients against its slice), the full state round trip,
and the trainer's gradients, weights, EMA, optimizer state and checkpoint (see test_parallel).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ditmoe.config import ModelConfig
from ditmoe.models.dit import DiT
from ditmoe.parallel.launch import spawn_local
from ditmoe.registry import get_config
from test_parallel import (FORWARD_CHAIN, GLOBAL_BATCH, GRAD_K, References, check_against_reference, model_overrides,
                              train_worker)
from tolerances import assert_close_fp32

EXPERTS = 8
PER_RANK = 3  # images per rank in the layer test (3 x 16 tokens x top-2 = 96 routed rows)
ALPHA = 0.01


def layer_config() -> ModelConfig:
    return get_config("debug").replace(num_experts=EXPERTS, input_size=8, class_dropout_prob=0.0, aux_alpha=ALPHA)


def layer_inputs(world: int) -> list[tuple[torch.Tensor, ...]]:
    """Each rank's (x, t, y, output weights), the same in every process."""
    gen = torch.Generator().manual_seed(1)
    n = world * PER_RANK
    x = torch.randn(n, 4, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    g = torch.randn(n, 8, 8, 8, generator=gen)  # learn_sigma: 8 output channels
    return [tuple(v[r * PER_RANK:(r + 1) * PER_RANK] for v in (x, t, y, g)) for r in range(world)]


def idle_experts(world: int) -> list[int]:
    """Experts the planted routing starves: all of the last rank's, and expert 1 (on rank 0)."""
    local = EXPERTS // world
    return [1] + list(range(EXPERTS - local, EXPERTS))


def plant_routing(model: torch.nn.Module, idle: list[int]) -> None:
    """Router logits get -1e4 on the idle experts (differentiable in the router weight as before)."""
    from ditmoe.models.moe import Assignment

    bias = torch.zeros(EXPERTS)
    bias[idle] = -1e4
    for _, moe in model.moe_layers():
        gate = moe.gate

        def forward(x, cond=None, gate=gate):
            probs = (F.linear(x.float(), gate.weight.float()) + bias).softmax(dim=-1)
            topk_w, topk_idx = torch.topk(probs, k=gate.top_k, dim=-1, sorted=False)
            return Assignment.top_k(topk_idx, topk_w, probs)

        gate.forward = forward


def forward_backward(model: torch.nn.Module, x, t, y, g) -> dict:
    out, aux = model(x, t, y, return_aux=True)
    ((out * g).sum() + aux.sum()).backward()
    return {"out": out.detach(), "aux": aux.detach()}


def layer_worker(rank: int, world: int, out: str) -> None:
    from ditmoe.parallel import apply_expert_parallel, gather_expert_state, load_expert_parallel_state

    torch.manual_seed(0)
    model = DiT(layer_config())  # the same full model on every rank
    apply_expert_parallel(model)
    x, t, y, g = layer_inputs(world)[rank]
    record = {}
    for scenario in ("natural", "planted"):
        if scenario == "planted":
            plant_routing(model, idle_experts(world))
        model.zero_grad(set_to_none=True)
        record[scenario] = forward_backward(model, x, t, y, g)
        record[scenario]["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    record["refused"] = refusals(world)
    record["gathered"] = gather_expert_state(model)  # complete on rank 0 only
    torch.manual_seed(0)
    shifted = {k: v + 1.0 for k, v in DiT(layer_config()).state_dict().items()}  # every rank loads the full state
    load_expert_parallel_state(model, shifted)
    record["regathered"] = gather_expert_state(model)
    torch.save(record, Path(out) / f"layer_rank{rank}.pt")


def refusals(world: int) -> dict[str, str]:
    """The errors for an expert count and an ep size that do not divide (raised before any collective)."""
    from ditmoe.models.moe import Experts
    from ditmoe.parallel import ExpertParallelExperts, expert_parallel_groups

    out = {}
    for what, fn in (("experts", lambda: ExpertParallelExperts(Experts(world + 1, 64, 128, "swiglu"))),
                     ("groups", lambda: expert_parallel_groups(world + 1))):
        try:
            fn()
            out[what] = "accepted"
        except ValueError as e:
            out[what] = str(e)
    return out


def ep_worker(rank: int, world: int, out: str, runs: list) -> None:
    layer_worker(rank, world, out)
    train_worker(rank, world, runs)


# world: [(name, TrainConfig kwargs)]; each process's balance loss is over its own micro-batch,
# so the single-process reference accumulates over (world x micro-batches per process).
TRAINER_RUNS = {
    2: [("ep", {"parallel": "ep"}),  # ep = world = 2
        ("ep_ckpt", {"parallel": "ep", "grad_checkpointing": True}),  # the backward recomputes the exchanges
        ("ep_global_balance", {"parallel": "ep", "balance_scope": "global"})],  # equals one big batch
    4: [("ep", {"parallel": "ep"}),  # ep = world = 4
        # dp 2 x ep 2, dense weights by DDP, 2 micro-batches per process (the first without sync)
        ("ep2_ddp_accum", {"parallel": "ep", "ep_size": 2, "micro_batch": GLOBAL_BATCH // 8}),
        # dp 2 x ep 2, dense weights by FSDP2; a sharded checkpoint (each expert slice FSDP-sharded
        # over its dp pair: test_parallel_sharded), read whole and resumed in one process below
        ("ep2_fsdp", {"parallel": "ep_fsdp", "ep_size": 2, "checkpoint_format": "sharded"})],
}


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def ep_run(request, tmp_path_factory):
    world = request.param
    root = tmp_path_factory.mktemp(f"ep{world}")
    runs = [(str(root / name), kw, model_overrides(ALPHA, num_experts=EXPERTS)) for name, kw in TRAINER_RUNS[world]]
    spawn_local(ep_worker, world, str(root), runs)
    return world, root


def test_layer_outputs_and_gradients_match_single_process(ep_run):
    world, root = ep_run
    records = [torch.load(root / f"layer_rank{r}.pt", weights_only=False) for r in range(world)]
    local = EXPERTS // world
    torch.manual_seed(0)
    ref = DiT(layer_config())
    for scenario in ("natural", "planted"):
        if scenario == "planted":
            plant_routing(ref, idle_experts(world))
            counts = {}
            ref.blocks[0].moe.observer = lambda moe, a, n: counts.setdefault("c", torch.bincount(a.expert, minlength=EXPERTS))
        ref.zero_grad(set_to_none=True)
        ref_out = [forward_backward(ref, *inp) for inp in layer_inputs(world)]
        if scenario == "planted":  # the planted routing really starved the last rank
            assert counts["c"][idle_experts(world)].sum() == 0 and counts["c"].sum() > 0
            ref.blocks[0].moe.observer = None
        # Each rank's experts run the rows of all ranks in one product, the reference those of one
        # rank at a time: the same sums in other orders, norm-relative within the debug DiT's fp32
        # chains (test_parallel: FORWARD_CHAIN for outputs and balance losses, twice that for
        # gradients; tolerances.py).
        for r, rec in enumerate(records):
            assert_close_fp32(rec[scenario]["out"], ref_out[r]["out"], GRAD_K, FORWARD_CHAIN, f"{scenario} out rank {r}")
            assert_close_fp32(rec[scenario]["aux"], ref_out[r]["aux"], GRAD_K, FORWARD_CHAIN, f"{scenario} aux rank {r}")
        for name, p in ref.named_parameters():
            if p.grad is None:
                assert all(name not in rec[scenario]["grads"] for rec in records), name
                continue
            if ".moe.experts." in name:  # each rank holds its slice of the experts (its gradient sums
                # the rows of every rank at once, the reference's rank by rank: +1 to the chain)
                for r, rec in enumerate(records):
                    assert_close_fp32(rec[scenario]["grads"][name], p.grad[r * local:(r + 1) * local], GRAD_K,
                                      2 * FORWARD_CHAIN + 1, f"{scenario} {name} rank {r}")
            else:  # dense weights: per-rank gradients of per-rank losses sum to the total (in rank order
                # on both sides: the reference accumulates rank by rank into .grad)
                total = sum(rec[scenario]["grads"][name] for rec in records)
                assert_close_fp32(total, p.grad, GRAD_K, 2 * FORWARD_CHAIN, f"{scenario} {name}")


def test_full_state_round_trip(ep_run):
    world, root = ep_run
    torch.manual_seed(0)
    full = DiT(layer_config()).state_dict()
    rec = torch.load(root / "layer_rank0.pt", weights_only=False)  # rank 0 writes checkpoints
    assert set(rec["gathered"]) == set(full)
    for k, v in full.items():
        assert torch.equal(rec["gathered"][k], v), k
        assert torch.equal(rec["regathered"][k], v + 1.0), k  # every rank loaded its slice
    for r in range(1, world):  # the others do not hold the full experts
        rec = torch.load(root / f"layer_rank{r}.pt", weights_only=False)
        assert not [k for k in rec["gathered"] if ".moe.experts." in k]
        assert set(rec["gathered"]) == {k for k in full if ".moe.experts." not in k}


@pytest.fixture(scope="module")
def ep_references(tmp_path_factory):
    return References(tmp_path_factory.mktemp("ep_ref"))


def test_trainer_matches_single_process(ep_run, ep_references, tmp_path):
    world, root = ep_run
    for name, kw in TRAINER_RUNS[world]:
        accumulate_over = GLOBAL_BATCH // kw.get("micro_batch", GLOBAL_BATCH // world)
        if kw.get("balance_scope") == "global":  # the balance loss of the whole batch: no split
            accumulate_over = 1
        ref, ref_record = ep_references.get(ALPHA, accumulate_over, num_experts=EXPERTS)
        check_against_reference(root / name, world, ref, ref_record, tmp_path / name,
                                model_overrides(ALPHA, num_experts=EXPERTS))


def test_bad_splits_are_refused_before_any_traffic(ep_run):
    world, root = ep_run
    rec = torch.load(root / "layer_rank0.pt", weights_only=False)
    assert "cannot be split evenly" in rec["refused"]["experts"]
    assert "must divide the world size" in rec["refused"]["groups"]


def test_train_cli_accepts_expert_parallel_flags():
    from ditmoe.cli import build_parser
    from ditmoe.cli.train import train_config_from_args

    args = build_parser().parse_args(["train", "--model", "debug", "--parallel", "ep", "--ep-size", "2"])
    cfg, _ = train_config_from_args(args)
    assert cfg.parallel == "ep" and cfg.ep_size == 2
    args = build_parser().parse_args(["train", "--parallel", "ep_fsdp", "--ep-size", "-1"])
    with pytest.raises(ValueError, match="ep_size must be >= 0"):
        train_config_from_args(args)
