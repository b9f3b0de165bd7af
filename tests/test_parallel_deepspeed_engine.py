"""The DeepSpeed ZeRO-2 / ZeRO-3 engine on 2 CPU processes (gloo) against single-process references.

Same harness as tests/test_parallel.py: noise and times are functions of the batch, and the
single-process reference accumulates over the ranks' micro-batches (the balance loss is per
process). Checked: the data shards, the first step's reduced gradients, weights, EMA and AdamW
state after 2 steps (from the checkpoint, in the single-process format), resuming that checkpoint
in one process, and the other direction: a single-process checkpoint resumed under ZeRO-3.

One run routes every token of rank 1 to experts 0 and 1, so experts 2 to 7 receive nothing there:
ZeRO-3 gathers parameters as modules run, and a layer that skipped its idle experts on one rank
would leave the other waiting forever (what happens to the official code's per-expert loop).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from test_parallel import (GLOBAL_BATCH, STEPS, WORLD, assert_optimizer_close, assert_state_close,  # noqa: E402
                              check_against_reference, instrument, model_overrides, reference_run, tolerances_of,
                              train_config)

from ditmoe.parallel.deepspeed_engine import deepspeed_config, load_user_config, merge_config  # noqa: E402
from ditmoe.parallel.launch import spawn_local  # noqa: E402
from ditmoe.train.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from ditmoe.train.loop import Trainer  # noqa: E402


def force_routing(model: torch.nn.Module, active) -> None:
    """While `active()` is true every router sends each token to experts 0 and 1."""
    from ditmoe.models.moe import Assignment, Router

    def forcing(real):
        def forward(x, cond=None):
            a = real(x, cond)
            if not active():
                return a
            forced = torch.tensor([0, 1], device=x.device).expand(a.num_tokens, 2)
            return Assignment.top_k(forced, a.probs.gather(1, forced), a.probs)

        return forward

    # Replacing `forward` (not a forward hook) keeps the module's outputs the ones DeepSpeed's
    # own hooks see: ZeRO-3 traces each module's backward through the tensors it returned.
    for m in model.modules():
        if isinstance(m, Router):
            m.forward = forcing(m.forward)


def train_worker(rank: int, world: int, runs: list[tuple[str, dict, dict, bool]]) -> None:
    for out, cfg_kw, overrides, starve in runs:
        tr = Trainer(train_config(Path(out), **cfg_kw), overrides)
        record = instrument(tr)
        if starve:
            force_routing(tr.model, lambda: rank == 1)
        tr.run()
        torch.save(record, Path(out) / f"record_rank{rank}.pt")


# name: (TrainConfig kwargs, alpha, micro-batches of the reference, rank 1 starves experts 2..7)
RUNS = {
    "zero2": ({"parallel": "zero2"}, 0.01, WORLD, False),
    "zero3": ({"parallel": "zero3"}, 0.01, WORLD, False),
    "zero2_alpha0": ({"parallel": "zero2"}, 0.0, 1, False),
    # 2 micro-batches per process: DeepSpeed divides by the accumulation count and reduces at the boundary
    "zero3_accum": ({"parallel": "zero3", "micro_batch": GLOBAL_BATCH // (2 * WORLD)}, 0.01, 2 * WORLD, False),
    "zero3_idle_experts": ({"parallel": "zero3"}, 0.01, WORLD, True),
    "zero3_global_balance": ({"parallel": "zero3", "balance_scope": "global"}, 0.01, 1, False),
}


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    spawn_local(train_worker, WORLD, [(str(root / name), kw, model_overrides(alpha), starve)
                                      for name, (kw, alpha, _, starve) in RUNS.items()])
    return root


def reference(out: Path, alpha: float, accumulate_over: int, starve: bool):
    """The single-process reference; with `starve`, micro-batch 1 of each step (rank 1's share
    in the distributed run) has its routing forced as rank 1's is there."""
    def force_on_rank1_share(tr: Trainer) -> None:
        calls = {"n": 0}
        real = tr.loss_terms

        def counted(x, y):
            calls["n"] += 1
            return real(x, y)

        tr.loss_terms = counted
        force_routing(tr.model, lambda: (calls["n"] - 1) % accumulate_over == 1)

    return reference_run(out, alpha, accumulate_over, prepare=force_on_rank1_share if starve else None)


@pytest.mark.parametrize("name", list(RUNS))
def test_zero_equals_single_process(zero_runs, name, tmp_path):
    kw, alpha, accumulate_over, starve = RUNS[name]
    ref, ref_record = reference(tmp_path / "ref", alpha, accumulate_over, starve)
    check_against_reference(zero_runs / name, WORLD, ref, ref_record, tmp_path, model_overrides(alpha))


def resume_worker(rank: int, world: int, out: str, ckpt: str, layout: str) -> None:
    tr = Trainer(train_config(Path(out), parallel=layout, steps=STEPS + 1, resume=ckpt), model_overrides(0.01))
    assert tr.step == STEPS
    instrument(tr)
    tr.run()


@pytest.mark.parametrize("layout", ["zero2", "zero3"])
def test_single_process_checkpoint_resumes_under_zero(tmp_path, layout):
    """Train 2 steps in one process, then a third under ZeRO and, as reference, in one process."""
    first, _ = reference(tmp_path / "first", 0.01, WORLD, False)
    ckpt = str(list_checkpoints(tmp_path / "first")[-1])
    spawn_local(resume_worker, WORLD, str(tmp_path / "zero"), ckpt, layout)
    cont = Trainer(train_config(tmp_path / "cont", micro_batch=GLOBAL_BATCH // WORLD, steps=STEPS + 1, resume=ckpt),
                   model_overrides(0.01))
    instrument(cont)
    cont.run()
    got = load_checkpoint(list_checkpoints(tmp_path / "zero")[-1])
    assert got["step"] == STEPS + 1
    # Both start from the same checkpoint: only the third step's gradients differ (summation order).
    g_tol, w_tol = tolerances_of(cont, 1)
    assert_state_close(got["model"], cont.model.state_dict(), "weights", w_tol)
    assert_state_close(got["ema"], cont.ema.state_dict(), "EMA", w_tol)
    assert_optimizer_close(got["optimizer"], cont.optimizer.state_dict(), "optimizer", g_tol)


# ----------------------------------------------------------------------------- configs

def test_generated_configs_carry_the_official_zero_settings():
    z2 = deepspeed_config(2, micro_batch=32, accum=1, world=8, lr=1e-4, precision="fp16")
    z3 = deepspeed_config(3, micro_batch=2, accum=1, world=8, lr=1e-4, precision="fp16")
    off = deepspeed_config(3, micro_batch=2, accum=1, world=8, lr=1e-4, precision="fp16", offload=True)
    assert (z2["train_batch_size"], z3["train_batch_size"]) == (256, 16)  # the official batch sizes
    assert z2["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                       "sub_group_size": 1e9}
    assert z3["zero_optimization"]["stage3_max_live_parameters"] == 1e9
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert z2["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                                                          "weight_decay": 0.0}}
    assert z2["torch_autocast"] == {"enabled": True, "dtype": "float16"}
    cpu = deepspeed_config(2, micro_batch=4, accum=2, world=2, lr=1e-3, device_type="cpu")
    assert cpu["optimizer"]["params"]["torch_adam"] is True and "torch_autocast" not in cpu
    assert cpu["train_batch_size"] == 16


def test_user_config_merges_and_batch_conflicts_are_refused(tmp_path):
    base = deepspeed_config(3, micro_batch=4, accum=1, world=2, lr=1e-3, device_type="cpu")
    # trailing commas, as DeepSpeed's own example files have
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage3_max_live_parameters": 5e8,},}')
    merged = merge_config(base, load_user_config(str(tmp_path / "ds.json")))
    assert merged["zero_optimization"]["stage3_max_live_parameters"] == 5e8
    assert merged["zero_optimization"]["stage"] == 3  # the rest is kept
    with pytest.raises(ValueError, match="train_batch_size=256 but this run has train_batch_size=8"):
        merge_config(base, {"train_batch_size": 256})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_user_config(str(tmp_path / "missing.json"))
    assert json.dumps(merged)  # still plain JSON for DeepSpeed


def test_deepspeed_options_need_a_deepspeed_layout():
    from ditmoe.config import TrainConfig

    with pytest.raises(ValueError, match="need --parallel zero2 or zero3"):
        TrainConfig(parallel="ddp", deepspeed_offload=True).validate()
    with pytest.raises(ValueError, match="compile is not supported"):
        TrainConfig(parallel="zero3", compile=True).validate()


def test_shared_memory_op_build_failure_falls_back(monkeypatch, capsys):
    """Without a compiler or Python headers DeepSpeed's CPU start-up op cannot be built: gloo then."""
    import importlib

    from ditmoe.parallel import deepspeed_engine

    comm = importlib.import_module("deepspeed.comm.torch")

    def broken():
        raise RuntimeError("Python.h: No such file or directory")

    monkeypatch.setattr(comm, "build_shm_op", broken)
    deepspeed_engine._optional_shared_memory_op()
    assert comm.build_shm_op() is None
    assert "could not be built (RuntimeError); using gloo's" in capsys.readouterr().out
