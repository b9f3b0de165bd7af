"""Training loop: exact resume, accumulation, balance-loss gradient, checkpoints and bad input."""

import errno
import json

import pytest
import torch

from ditmoe.cli import main
from ditmoe.config import TrainConfig
from ditmoe.train import checkpoint as ckpt_mod
from ditmoe.train.checkpoint import list_checkpoints, load_checkpoint
from ditmoe.train.loop import Trainer
from tolerances import TINY_DIT_GRAD_CHAIN, TINY_DIT_K, assert_close_fp32


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(model="debug", data="digits", out=str(tmp_path / "run"), steps=4, global_batch=16, lr=1e-3,
                ema_decay=0.9, log_every=2, ckpt_every=2, keep_last=2, progress=False, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def tiny_trainer(tmp_path, overrides=None, **kw) -> Trainer:
    return Trainer(tiny_cfg(tmp_path, **kw), {"input_size": 8, **(overrides or {})})


@pytest.mark.parametrize("process", ["flow", "ddpm"])
def test_resume_is_exact(tmp_path, process):
    straight = tiny_trainer(tmp_path / "a", process=process)
    straight.run()
    first = tiny_trainer(tmp_path / "b", process=process, steps=2)
    first.run()
    resumed = tiny_trainer(tmp_path / "b", process=process, steps=4, resume="auto")
    assert resumed.step == 2
    resumed.run()
    # The same steps on the same data through the same code in one process: bit for bit.
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    for (k, a), (_, b) in zip(straight.ema.state_dict().items(), resumed.ema.state_dict().items()):
        assert torch.equal(a, b), k



def test_accumulation_equals_one_big_batch(tmp_path):
    grads = []
    x = torch.randn(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    t_all = torch.rand(16)
    for accum in (1, 4):
        tr = tiny_trainer(tmp_path / f"acc{accum}", overrides={"aux_alpha": 0.0, "class_dropout_prob": 0.0})
        torch.manual_seed(0)
        micro = 16 // accum
        batches = [(x[i:i + micro], y[i:i + micro]) for i in range(0, 16, micro)]
        queue = [t_all[i:i + micro] for i in range(0, 16, micro)]
        tr.draw_noise = lambda xb: torch.sin(7.0 * xb + 1.0)
        tr.draw_times = lambda n, dev, q=queue: q.pop(0)
        tr.accumulate(batches)
        grads.append({n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None})
    # One batch against four micro-batches: the same fp32 gradients summed in another order. "debug"
    # is the fixtures' shape; a batch of 16 images has 256 tokens, as long as the MLP's 256 (tolerances.py).
    for k in grads[0]:
        assert_close_fp32(grads[1][k], grads[0][k], TINY_DIT_K, TINY_DIT_GRAD_CHAIN, k)


def analytic_router_grad(x_tokens, weight, topk_idx, k):
    """d/dW of sum_i f_i P_i for one batch of tokens (f treated as constant, as in Eq. 5)."""
    p = torch.softmax(x_tokens.double() @ weight.double().t(), dim=-1)  # (T, E)
    t, e = p.shape
    f = torch.bincount(topk_idx.reshape(-1), minlength=e).double() * e / (k * t)
    dz = p * (f - (p * f).sum(-1, keepdim=True)) / t  # (T, E)
    return dz.t() @ x_tokens.double()  # (E, D)


@pytest.mark.parametrize("accum,loss_scale", [(1, 1.0), (4, 1.0), (4, 65536.0)])
def test_balance_loss_gradient_is_alpha_times_analytic(tmp_path, accum, loss_scale):
    alpha = 0.01
    tr = tiny_trainer(tmp_path, overrides={"aux_alpha": alpha})
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale, enabled=loss_scale != 1.0)
    # Only the balance loss: zero the diffusion term (keeping the graph).
    real = tr.process.training_losses

    def balance_only(*a, **kw):
        terms = real(*a, **kw)
        terms["loss"] = terms["loss"] * 0.0
        return terms

    tr.process.training_losses = balance_only
    captured = []
    moe = tr.model.blocks[1].moe
    orig_gate = moe.gate.forward

    def spy(x, cond=None):
        out = orig_gate(x, cond)
        captured.append((x.detach().clone(), out.expert_ids.detach().clone()))
        return out

    moe.gate.forward = spy
    x = torch.randn(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    micro = 16 // accum
    tr.accumulate([(x[i:i + micro], y[i:i + micro]) for i in range(0, 16, micro)])
    tr.scaler.unscale_(tr.optimizer)
    expected = sum(analytic_router_grad(xt, moe.gate.weight.detach(), idx, 2) for xt, idx in captured) * alpha / accum
    # Against float64: router logits (K 64), softmax, and dz^T x over the batch's 256 tokens in fp32
    # (loss scales are powers of two: exact), a chain of three reductions of length <= 256.
    assert_close_fp32(moe.gate.weight.grad, expected, 256, chain=3)


def test_checkpoint_contents_and_keep_last(tmp_path):
    tr = tiny_trainer(tmp_path, steps=6, ckpt_every=2, keep_last=2)
    tr.run()
    paths = list_checkpoints(tmp_path / "run")
    assert [p.name for p in paths] == ["step_0000004.pt", "step_0000006.pt"]
    state = load_checkpoint(paths[-1])
    assert state["step"] == 6 and "ema" in state and "optimizer" in state and "rng" in state
    assert "exponential moving average" in state["weights_note"]
    assert json.loads(state["model_config"])["input_size"] == 8
    assert (tmp_path / "run" / "model_ema.safetensors").exists()
    from ditmoe.convert import load_model

    ema = load_model(tmp_path / "run" / "model_ema.safetensors")
    for k, v in ema.state_dict().items():
        assert torch.equal(v, state["ema"][k])


def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    tr = tiny_trainer(tmp_path, steps=2)
    tr.run()
    good = list_checkpoints(tmp_path / "run")[-1]

    def full_disk(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    tr.step = 3
    with pytest.raises(RuntimeError, match=r"No space left on device.*step_0000002.pt is intact"):
        tr.save()
    monkeypatch.undo()
    assert list_checkpoints(tmp_path / "run") == [good]
    assert load_checkpoint(good)["step"] == 2
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_resume_with_another_config_is_refused(tmp_path):
    tiny_trainer(tmp_path, steps=2).run()
    with pytest.raises(ValueError, match=r"another model config \(num_experts: checkpoint 4 vs now 2"):
        tiny_trainer(tmp_path, overrides={"num_experts": 2}, resume="auto")


def test_unknown_model_name_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["train", "--model", "DiT-MoE-Z/2", "--data", "digits", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model name 'DiT-MoE-Z/2'" in err and "DiT-MoE-S/2-8E2A" in err


def test_truncated_checkpoint_is_reported(tmp_path):
    bad = tmp_path / "step_0000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint") as err:
        load_checkpoint(bad)
    assert "Older checkpoints in" in str(err.value) and "weights_only=False" not in str(err.value)


def test_unsafe_checkpoint_is_refused_as_unsafe_not_truncated(tmp_path):
    bad = tmp_path / "step_0000001.pt"
    torch.save({"step": 1, "payload": print}, bad)  # a global the weights-only unpickler refuses
    with pytest.raises(ValueError, match="holds Python objects other than tensors") as err:
        load_checkpoint(bad)
    assert "truncated" not in str(err.value) and "weights_only=False" not in str(err.value)


def test_train_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for field in TrainConfig.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in out, field
    flat = " ".join(out.split())
    assert "--steps INT optimizer steps (global batches) (default: 3000)" in flat  # the field's help metadata
    assert "--lr FLOAT AdamW learning rate (constant after the warm-up) (default: 0.0001)" in flat
    assert "--process {flow,ddpm} flow (rectified flow)" in flat  # enumerated options show their choices
    assert "--parallel {none,ddp,fsdp,ep,ep_fsdp,zero2,zero3}" in flat
    assert "--logger {csv,tensorboard,wandb}[,...]" in flat
    assert "--progress {true,false} progress bar on the terminal (default: True)" in flat
    assert ("--model-num-experts INT routed experts per MoE layer; 0 makes every block dense (default: registry "
            "value)") in flat
    assert "--model-shared-hidden INT|none" in flat and "--model-attn-layout {qkv,fused_qknorm}" in flat


def test_config_file_and_flags(tmp_path):
    from ditmoe.cli.train import train_config_from_args
    from ditmoe.cli import build_parser

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 7\nlr: 0.0003\nmodel_overrides:\n  num_experts: 6\n")
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--lr", "0.0005", "--model-top-k", "3"])
    cfg, overrides = train_config_from_args(args)
    assert cfg.steps == 7 and cfg.lr == 0.0005 and overrides == {"num_experts": 6, "top_k": 3}


def test_cli_train_writes_run_folder(tmp_path):
    out = tmp_path / "cli"
    assert main(["train", "--model", "debug", "--model-input-size", "8", "--data", "digits", "--steps", "3",
                 "--global-batch", "8", "--log-every", "1", "--out", str(out), "--progress", "false"]) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and "balance" in rows[0] and len(rows) == 4
    loads = (out / "expert_load.csv").read_text().splitlines()
    assert loads[0] == "step,layer,expert_0,expert_1,expert_2,expert_3" and len(loads) == 1 + 3 * 2
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3


def test_ema_warmup_closed_form():
    from ditmoe.train.ema import EMA

    live = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        live.weight.zero_()
    ema = EMA(live, decay=0.999, warmup=True)
    with torch.no_grad():
        live.weight.fill_(1.0)
    # e_s = d_s e_{s-1} + (1 - d_s) * 1 with d_s = min(0.999, (1 + s) / (10 + s)), e_{-1} = 0.
    expected = 0.0
    for s in range(50):
        ema.update(live, s)
        d = min(0.999, (1 + s) / (10 + s))
        expected = d * expected + (1 - d)
    # fp32 against float64: each update d e + (1 - d) rounds <= 3 times (u = 2^-24), and d <= 50/59
    # shrinks earlier errors: <= 3u / (1 - 50/59) = 1.2e-6 < 1e-5 (no warm-up would give 0.05 here).
    assert abs(ema.model.weight[0, 0].item() - expected) < 1e-5
    assert ema.decay_at(0) == 0.1 and ema.decay_at(10**6) == 0.999
    fixed = EMA(live, decay=0.9, warmup=False)
    assert fixed.decay_at(0) == 0.9


def test_model_ema_copied_out_of_its_run_keeps_its_process(tmp_path):
    import shutil

    from ditmoe.generate import load_for_sampling

    tiny_trainer(tmp_path, steps=1, process="flow").run()
    alone = tmp_path / "elsewhere" / "weights.safetensors"
    alone.parent.mkdir()
    shutil.copy(tmp_path / "run" / "model_ema.safetensors", alone)  # no config.json of the run beside it
    assert load_for_sampling(alone, "ema", None, "cpu").process == "flow"


@pytest.mark.parametrize("decay", ["none", "linear", "cosine"])
def test_learning_rate_schedule_against_its_formula(decay):
    import math

    from ditmoe.train.loop import lr_at

    cfg = TrainConfig(steps=110, lr=2e-3, warmup_steps=10, lr_decay=decay, lr_decay_fraction=0.5, lr_final=1e-4)
    lrs = [lr_at(cfg, s) for s in range(cfg.steps)]
    assert lrs[:10] == pytest.approx([2e-3 * (s + 1) / 10 for s in range(10)])
    # 50 decay steps end at step 109; before step 59 the rate is flat.
    assert lrs[10:60] == pytest.approx([2e-3] * 50)
    for s in range(59, 110):
        frac = (s - 59) / 50
        if decay == "cosine":
            frac = (1 - math.cos(math.pi * frac)) / 2
        want = 2e-3 if decay == "none" else 2e-3 + (1e-4 - 2e-3) * frac
        assert lrs[s] == pytest.approx(want, rel=1e-12)
    assert lrs[-1] == pytest.approx(2e-3 if decay == "none" else 1e-4)


@pytest.mark.parametrize("field,value", [("lr_decay_fraction", 0.0), ("lr_decay_fraction", 1.5), ("lr_final", -1e-4),
                                         ("lr_final", 1.0)])
def test_bad_learning_rate_decay_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(lr=1e-3, lr_decay="cosine", **{field: value}).validate()
