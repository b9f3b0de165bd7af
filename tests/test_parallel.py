"""DDP and FSDP2 through the trainer on 2 CPU processes (gloo) against single-process references.

One spawn trains every (layout, balance-loss weight) pair for 2 steps and records what the
trainer did; the tests below compare that with single-process runs of the same global batches:
the union of the ranks' micro-batches, the first step's gradients, the weights, EMA and optimizer
state after 2 steps (from the checkpoint, which must hold full single-process state dicts), and
resuming from that checkpoint in one process.

Noise and times are drawn from the batch itself (the per-rank noise streams of a distributed run
cannot equal a single process's stream), and label dropout is off. The balance loss is computed
per process over that process's tokens (as each GPU does in the paper's code), so the reference
for alpha > 0 is the single-process run accumulating over world-many micro-batches of the same
split; with alpha = 0, or with `balance_scope="global"` (counts and probabilities summed over the
processes), it is one big batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ditmoe.config import TrainConfig
from ditmoe.parallel.launch import spawn_local
from ditmoe.train.checkpoint import list_checkpoints, load_checkpoint
from ditmoe.train.loop import StepBatchSampler, Trainer
from tolerances import TINY_DIT_CHAIN, TINY_DIT_K, adam_weight_tol, bf16_order_tol, fp32_tol, rel_err, rms_diff

WORLD = 2
GLOBAL_BATCH = 16
STEPS = 2


# ----------------------------------------------------------------------------- shared helpers
def train_config(out: Path, **kw) -> TrainConfig:
    base = dict(model="debug", data="digits", out=str(out), steps=STEPS, global_batch=GLOBAL_BATCH, lr=1e-3,
                ema_decay=0.9, log_every=1, ckpt_every=100, keep_last=2, progress=False, precision="fp32",
                grad_clip=1.0)  # the clip is active (grad norm ~2.5): clipping must see the global norm
    base.update(kw)
    return TrainConfig(**base)


def model_overrides(alpha: float, **kw) -> dict:
    return {"input_size": 8, "class_dropout_prob": 0.0, "aux_alpha": alpha, **kw}


def instrument(tr: Trainer) -> dict:
    """Make noise and times functions of the batch; record micro-batches and first-step gradients."""
    from ditmoe.parallel import full_gradients

    record: dict = {"batches": [], "grads": None}
    tr.draw_noise = lambda x: torch.sin(7.0 * x + 1.0)
    real_loss_terms, real_accumulate, real_step = tr.loss_terms, tr.accumulate, tr.optimizer_step

    def loss_terms(x, y):
        tr.draw_times = lambda n, dev: torch.sigmoid(3.0 * x.flatten(1).mean(1) + 0.1 * y.float() - 0.5)
        return real_loss_terms(x, y)

    def accumulate(micro_batches):
        record["batches"].append([(x.clone(), y.clone()) for x, y in micro_batches])
        return real_accumulate(micro_batches)

    def optimizer_step():
        if record["grads"] is None:
            record["grads"] = full_gradients(tr.model)  # collective under FSDP / expert parallelism
        return real_step()

    tr.loss_terms, tr.accumulate, tr.optimizer_step = loss_terms, accumulate, optimizer_step
    return record


def train_worker(rank: int, world: int, runs: list[tuple[str, dict, dict]]) -> None:
    """For each (out folder, TrainConfig kwargs, model overrides): train and save what happened."""
    for out, cfg_kw, overrides in runs:
        tr = Trainer(train_config(Path(out), **cfg_kw), overrides)
        record = instrument(tr)
        tr.run()
        torch.save(record, Path(out) / f"record_rank{rank}.pt")


def reference_run(out: Path, alpha: float, accumulate_over: int, precision: str = "fp32",
                  prepare=None, **overrides) -> tuple[Trainer, dict]:
    """Single process; `accumulate_over` micro-batches per step (= world when alpha > 0).
    `prepare(trainer)`, if given, runs after instrumenting and before training."""
    tr = Trainer(train_config(out, micro_batch=GLOBAL_BATCH // accumulate_over, precision=precision),
                 model_overrides(alpha, **overrides))
    record = instrument(tr)
    if prepare is not None:
        prepare(tr)
    tr.run()
    return tr, record


# What the distributed runs may differ by. Ranks sum in other orders than one process (each rank's
# products over its own tokens, then the all-reduce or reduce-scatter of the ranks' gradients), so
# nothing is bit-exact but the data shards and the step count. The debug DiT is the tiny fixture
# DiT's shape (hidden 64, depth 2, 16 tokens) with a MoE in place of each MLP (one more reduction
# per block: the weighted sum of the slots and the shared expert); its longest reduction is the
# routed experts' width 256 (also the 16 x 16 tokens a weight gradient sums over).
GRAD_K = TINY_DIT_K
FORWARD_CHAIN = TINY_DIT_CHAIN + 2
GRAD_CHAIN = 2 * FORWARD_CHAIN + 1  # the backward mirrors the forward; +1: the sum over ranks / micro-batches


def grad_tol(precision: str) -> float:
    """Norm-relative bound on first-step gradients of the two layouts (tolerances.py): fp32 chains
    of differently ordered sums; under bf16 autocast both sides round the same products to bf16,
    which differ only where the fp32 accumulations straddle a rounding boundary."""
    if precision == "fp32":
        return fp32_tol(GRAD_K, GRAD_CHAIN)
    assert precision == "bf16", precision
    return bf16_order_tol(GRAD_K, GRAD_CHAIN)


def assert_grads_close(got: dict, want: dict, what: str, tol: float) -> None:
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
    for k in want:  # per tensor, norm-relative: gradients equal up to summation order
        err = rel_err(got[k].float(), want[k].float())
        assert err <= tol, f"{what} {k}: norm-relative error {err:.3g} > {tol:.3g}"


def assert_state_close(got: dict, want: dict, what: str, rms_tol: float) -> None:
    """Weights or EMA after Adam steps: RMS difference per tensor within `rms_tol`
    (tolerances.adam_weight_tol; the EMA is a convex combination of the weights, so the same bound)."""
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
    for k in want:
        d = rms_diff(got[k].float(), want[k].float())
        assert d <= rms_tol, f"{what} {k}: RMS difference {d:.3g} > {rms_tol:.3g}"


def assert_optimizer_close(got: dict, want: dict, what: str, tol: float) -> None:
    """AdamW state from gradients within norm-relative `tol`: the step count exactly; exp_avg is
    linear in the clipped gradients (their error plus the clip coefficient's: 2 * tol);
    exp_avg_sq in their squares (twice that: 4 * tol)."""
    assert got["param_groups"][0]["params"] == want["param_groups"][0]["params"], what
    assert set(got["state"]) == set(want["state"]), what
    bounds = {"exp_avg": 2 * tol, "exp_avg_sq": 4 * tol}
    for i, s in want["state"].items():
        assert set(got["state"][i]) == set(s), f"{what} param {i}: keys {sorted(got['state'][i])} != {sorted(s)}"
        for key, v in s.items():
            a, e = torch.as_tensor(got["state"][i][key]).float(), torch.as_tensor(v).float()
            if key == "step":
                assert torch.equal(a, e), f"{what} param {i} step: {a} != {e}"
                continue
            err = rel_err(a, e)
            assert err <= bounds[key], f"{what} param {i} {key}: norm-relative error {err:.3g} > {bounds[key]:.3g}"


def tolerances_of(ref: Trainer, steps: int) -> tuple[float, float]:
    """(gradient / optimizer-state norm-relative bound, weight RMS bound) for a reference run."""
    g = grad_tol(ref.cfg.precision)
    return g, adam_weight_tol(g, ref.cfg.lr, steps)


def check_against_reference(out: Path, world: int, ref: Trainer, ref_record: dict, ref_dir: Path,
                            overrides: dict) -> None:
    """Every check of a distributed run `out` against the single-process reference."""
    records = [torch.load(out / f"record_rank{r}.pt", weights_only=False) for r in range(world)]
    # The ranks' micro-batches of each step, in rank order, are exactly the reference's batch.
    for step, ref_micro in enumerate(ref_record["batches"]):
        ref_x = torch.cat([x for x, _ in ref_micro])
        ref_y = torch.cat([y for _, y in ref_micro])
        got_x = torch.cat([x for rec in records for x, _ in rec["batches"][step]])
        got_y = torch.cat([y for rec in records for _, y in rec["batches"][step]])
        assert torch.equal(got_x, ref_x) and torch.equal(got_y, ref_y), f"step {step}: data shards differ"
    g_tol, w_tol = tolerances_of(ref, STEPS)
    # First-step gradients (before clipping), on every rank after synchronisation.
    for rec in records:
        assert_grads_close(rec["grads"], ref_record["grads"], "gradient", g_tol)
    # Weights, EMA and optimizer state after the steps: the checkpoint holds full state dicts.
    state = load_checkpoint(list_checkpoints(out)[-1])
    assert state["step"] == STEPS
    assert_state_close(state["model"], ref.model.state_dict(), "weights", w_tol)
    assert_state_close(state["ema"], ref.ema.state_dict(), "EMA", w_tol)
    assert_optimizer_close(state["optimizer"], ref.optimizer.state_dict(), "optimizer", g_tol)
    from ditmoe.convert import load_model

    ema_file = load_model(out / "model_ema.safetensors")
    assert_state_close(ema_file.state_dict(), ref.ema.state_dict(), "exported EMA", w_tol)
    # ... and resumes in one process.
    resumed = Trainer(train_config(ref_dir / "resumed", resume=str(list_checkpoints(out)[-1])), overrides)
    assert resumed.step == STEPS
    assert_state_close(resumed.model.state_dict(), ref.model.state_dict(), "resumed weights", w_tol)
    assert_state_close(resumed.ema.state_dict(), ref.ema.state_dict(), "resumed EMA", w_tol)
    assert_optimizer_close(resumed.optimizer.state_dict(), ref.optimizer.state_dict(), "resumed optimizer", g_tol)


# ----------------------------------------------------------------------------- the runs
# name: (TrainConfig kwargs, balance-loss alpha, micro-batches of the single-process reference)
RUNS = {
    "ddp_alpha0": ({"parallel": "ddp"}, 0.0, 1),  # no balance loss: one big batch
    "fsdp_alpha0": ({"parallel": "fsdp"}, 0.0, 1),
    "ddp": ({"parallel": "ddp"}, 0.01, WORLD),  # per-process balance losses: WORLD micro-batches
    "fsdp": ({"parallel": "fsdp"}, 0.01, WORLD),
    # 2 micro-batches per process: DDP skips the all-reduce on the first, FSDP reduces both
    "ddp_accum": ({"parallel": "ddp", "micro_batch": GLOBAL_BATCH // (2 * WORLD)}, 0.01, 2 * WORLD),
    # ... and writes a sharded checkpoint (tests/test_parallel_sharded.py), checked like the files
    "fsdp_accum": ({"parallel": "fsdp", "micro_batch": GLOBAL_BATCH // (2 * WORLD), "checkpoint_format": "sharded"},
                   0.01, 2 * WORLD),
    # bf16: FSDP all-gathers the blocks' weights in bf16; single-process autocast casts them
    "fsdp_bf16": ({"parallel": "fsdp", "precision": "bf16"}, 0.01, WORLD),
    # a balance loss over both processes' tokens: equals one big batch even with alpha > 0
    "ddp_global_balance": ({"parallel": "ddp", "balance_scope": "global"}, 0.01, 1),
    "fsdp_global_balance": ({"parallel": "fsdp", "balance_scope": "global"}, 0.01, 1),
}


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    spawn_local(train_worker, WORLD, [(str(root / name), kw, model_overrides(alpha))
                                      for name, (kw, alpha, _) in RUNS.items()])
    return root


class References:
    """Single-process reference runs, made on first use and shared by the tests."""

    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def get(self, alpha: float, accumulate_over: int, precision: str = "fp32", **overrides):
        key = (alpha, accumulate_over, precision, tuple(sorted(overrides.items())))
        if key not in self.cache:
            out = self.root / f"ref_{len(self.cache)}"
            self.cache[key] = reference_run(out, alpha, accumulate_over, precision, **overrides)
        return self.cache[key]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return References(tmp_path_factory.mktemp("ref"))


@pytest.mark.parametrize("name", list(RUNS))
def test_data_parallel_equals_single_process(dist_runs, references, name, tmp_path):
    kw, alpha, accumulate_over = RUNS[name]
    ref, ref_record = references.get(alpha, accumulate_over, kw.get("precision", "fp32"))
    check_against_reference(dist_runs / name, WORLD, ref, ref_record, tmp_path, model_overrides(alpha))


def test_balance_loss_is_per_process():
    """Documents the semantics: with alpha > 0 the sharded run equals accumulation, not one big batch."""
    from ditmoe.models.moe import balance_loss

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(64, 4), -1)
    idx = torch.topk(probs, 2, -1).indices
    whole = balance_loss(probs, idx, 4, 1.0)
    halves = (balance_loss(probs[:32], idx[:32], 4, 1.0) + balance_loss(probs[32:], idx[32:], 4, 1.0)) / 2
    assert not torch.allclose(whole, halves)  # so the per-process loss is a (slightly) different objective


@pytest.mark.parametrize("world,micro", [(2, 8), (2, 4), (4, 2), (3, 4)])
def test_rank_shards_partition_the_global_batch(world, micro):
    g = micro * world * (2 if micro < 8 else 1)
    single = StepBatchSampler(100, g, g, 0, 1, seed=3, start_step=0, steps=5)
    per_step = g // (world * micro)
    shards = [list(StepBatchSampler(100, g, micro, r, world, seed=3, start_step=0, steps=5)) for r in range(world)]
    for step, batch in enumerate(single):
        union = [i for r in range(world) for mb in shards[r][step * per_step:(step + 1) * per_step] for i in mb]
        assert union == batch

