"""Stateful routers under DDP, FSDP2 and expert parallelism (2 gloo processes) against one process.

Each process's micro-batch is one micro-batch of a single-process run that accumulates over two
(prototype's contrastive loss is per micro-batch too):
the routers' statistics are per micro-batch (race's pool, topk_bias's load counts), so that run is
the reference; the bias must come from the load of the whole global batch (both processes), the
race threshold from the cut-offs of both. Noise and times are functions of the batch and label
dropout is off, as in test_parallel.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ditmoe.parallel.launch import spawn_local
from ditmoe.train.loop import Trainer
from test_parallel import GLOBAL_BATCH, WORLD, instrument, train_config
from tolerances import TINY_DIT_CHAIN, TINY_DIT_K, fp32_tol, rel_err

ROUTERS = ("topk_bias", "race", "expert_choice", "token_pool", "prototype")
LAYOUTS = ("ddp", "ep", "fsdp", "ep_fsdp") + (("zero2", "zero3") if importlib.util.find_spec("deepspeed") else ())


def overrides(kind: str) -> dict:
    # prototype needs a null class; its label dropout is made a function of the labels (`fixed_dropout`)
    return {"input_size": 8, "class_dropout_prob": 0.1 if kind == "prototype" else 0.0, "router": kind,
            "bias_update_rate": 0.01}


def fixed_dropout(tr: Trainer) -> None:
    """Label dropout as a function of the label (every label divisible by 3 dropped), so the
    unconditional images are the same in every layout (random draws differ per rank)."""
    emb = tr.model.y_embedder
    emb.token_drop = lambda labels, force_drop_ids=None: torch.where(labels % 3 == 0, emb.num_classes, labels)


def worker(rank: int, world: int, root: str) -> None:
    for layout in LAYOUTS:
        for kind in ROUTERS:
            out = Path(root) / f"{layout}_{kind}"
            tr = Trainer(train_config(out, parallel=layout, grad_clip=0.0), overrides(kind))
            instrument(tr)
            fixed_dropout(tr)
            tr.run()
            model, ema = tr.engine.full_model_state(), tr.full_ema_state()  # collectives (FSDP, ZeRO)
            torch.save({"model": {k: v for k, v in model.items() if ".gate." in k},  # full states: rank 0 only
                        "ema": {k: v for k, v in ema.items() if ".gate." in k},
                        "buffers": {k: v.clone() for k, v in tr.model.state_dict().items()
                                    if ".gate." in k and k.endswith(("gate.bias", "threshold", "thresholds"))}},
                       out / f"gates_rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("routers_parallel")
    spawn_local(worker, WORLD, str(root))
    return root


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ROUTERS)
def test_router_state_equals_one_process(runs, tmp_path, layout, kind):
    ref = Trainer(train_config(tmp_path / "ref", micro_batch=GLOBAL_BATCH // WORLD, grad_clip=0.0), overrides(kind))
    instrument(ref)
    fixed_dropout(ref)
    ref.run()
    got = torch.load(runs / f"{layout}_{kind}" / "gates_rank0.pt", weights_only=True)
    other = torch.load(runs / f"{layout}_{kind}" / "gates_rank1.pt", weights_only=True)
    assert got["buffers"] or kind in ("expert_choice", "prototype")
    for k, v in got["buffers"].items():  # every process holds the same router state
        assert torch.equal(other["buffers"][k], v), k
    want = {k: v for k, v in ref.model.state_dict().items() if ".gate." in k}
    assert set(got["model"]) == set(want)
    tol = fp32_tol(TINY_DIT_K, 2 * TINY_DIT_CHAIN + 3)
    for k, v in want.items():
        if k.endswith("gate.bias"):  # multiples of u from signs of integer loads: the same steps
            assert torch.allclose(got["model"][k], v, atol=1e-6), (k, got["model"][k], v)
            assert float(v.abs().max()) > 0
        elif k.endswith("threshold_updates"):
            assert int(got["model"][k]) == int(v) == 2
        else:  # router weights and the threshold: equal up to summation order
            assert rel_err(got["model"][k], v) <= tol, k
        assert torch.equal(got["ema"][k], got["model"][k]) or not k.endswith(("gate.bias", "threshold", "thresholds")), k
