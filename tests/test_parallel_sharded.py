"""Sharded checkpoints (torch.distributed.checkpoint) on 2 CPU processes (gloo), and reading them in one.

One spawn trains, on 2 processes:

- "fsdp": FSDP2 for 4 steps with `--checkpoint-format auto` and a threshold of 0 GB, so auto picks
  sharded; checkpoints at steps 2 and 4. The uninterrupted run every resume is compared with.
- "fsdp_resumed": FSDP2 again from fsdp's step-2 folder to step 4: the same layout, the same
  per-rank RNG streams (restored from the side file), so bit for bit fsdp's step 4.
- "ep_resumed": expert parallelism (ep 2, dense weights by DDP) from the same folder: DCP cuts each
  rank's experts out of the global tensors; it writes its own sharded step 4.
- "ep_fsdp_resumed": ep_fsdp with ep 1 (each layer's experts FSDP-sharded over both ranks).
- "file" then "from_file": a single-file checkpoint at step 2 (FSDP, gathered on rank 0), which a
  sharded FSDP run resumes to step 4: bit for bit fsdp's step 4 again.

In this process: resuming fsdp's step-2 folder with one plain process, `ditmoe convert` of a folder,
the folder listing / pruning / temporary-folder rules, and damaged folders. Noise and times are
functions of the batch and label dropout is off (test_parallel.instrument), so runs under other
layouts differ only in the order of their sums; those are compared with test_parallel's bounds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ditmoe.cli import main
from ditmoe.convert import load_model
from ditmoe.parallel.launch import spawn_local
from ditmoe.train.checkpoint import choose_format, list_checkpoints, load_checkpoint, prune
from ditmoe.train.loop import Trainer
from test_parallel import (GLOBAL_BATCH, assert_optimizer_close, assert_state_close, grad_tol, instrument,
                              model_overrides, train_config)
from tolerances import adam_weight_tol

WORLD = 2
ALPHA = 0.01  # each process's balance loss over its own tokens, under every layout here
STEPS = 4
RESUME_AT = 2

# name: (TrainConfig kwargs, resume from: (run, checkpoint name) or None)
RUNS = {
    "fsdp": ({"parallel": "fsdp", "checkpoint_format": "auto", "sharded_above_gb": 0.0, "ckpt_every": 2}, None),
    "fsdp_resumed": ({"parallel": "fsdp", "checkpoint_format": "sharded"}, ("fsdp", "step_0000002.dcp")),
    "ep_resumed": ({"parallel": "ep", "checkpoint_format": "sharded"}, ("fsdp", "step_0000002.dcp")),
    "ep_fsdp_resumed": ({"parallel": "ep_fsdp", "ep_size": 1, "checkpoint_format": "sharded"},
                        ("fsdp", "step_0000002.dcp")),
    "file": ({"parallel": "fsdp", "checkpoint_format": "file", "steps": RESUME_AT}, None),
    "from_file": ({"parallel": "fsdp", "checkpoint_format": "sharded"}, ("file", "step_0000002.pt")),
}


def worker(rank: int, world: int, root: str) -> None:
    for name, (kw, source) in RUNS.items():
        kw = {"steps": STEPS, **kw}
        if source is not None:
            kw["resume"] = str(Path(root) / source[0] / "checkpoints" / source[1])
        tr = Trainer(train_config(Path(root) / name, **kw), model_overrides(ALPHA))
        instrument(tr)
        tr.run()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    spawn_local(worker, WORLD, str(root))
    return root


def final_state(run: Path) -> dict:
    return load_checkpoint(list_checkpoints(run)[-1])  # a sharded folder read whole, in this process


def assert_states_equal(got: dict, want: dict, what: str) -> None:
    for part in ("model", "ema"):
        assert set(got[part]) == set(want[part]), what
        for k, v in want[part].items():
            assert torch.equal(got[part][k], v), f"{what}: {part} {k} differs"
    for i, s in want["optimizer"]["state"].items():
        for key, v in s.items():
            assert torch.equal(got["optimizer"]["state"][i][key], v), f"{what}: optimizer {i} {key} differs"


def other_layout_tolerances() -> tuple[float, float]:
    """(gradient / AdamW-state bound, weight RMS bound) between a layout and another for the steps
    after the resume: the same state at step 2, then sums in other orders (test_parallel)."""
    g = grad_tol("fp32")
    return g, adam_weight_tol(g, train_config(Path("unused")).lr, STEPS - RESUME_AT)


def assert_states_close(got: dict, want: dict, what: str) -> None:
    g_tol, w_tol = other_layout_tolerances()
    assert_state_close(got["model"], want["model"], f"{what} weights", w_tol)
    assert_state_close(got["ema"], want["ema"], f"{what} EMA", w_tol)
    assert_optimizer_close(got["optimizer"], want["optimizer"], f"{what} optimizer", g_tol)


def test_auto_writes_sharded_folders_and_keeps_the_last(runs):
    paths = list_checkpoints(runs / "fsdp")
    assert [p.name for p in paths] == ["step_0000002.dcp", "step_0000004.dcp"]
    files = sorted(p.name for p in paths[-1].iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.pt"]  # one shard file per rank
    state = final_state(runs / "fsdp")
    assert state["step"] == STEPS and state["world_size"] == WORLD and len(state["rng_per_rank"]) == WORLD
    # The folder holds what a single-process checkpoint holds: full tensors under the same names.
    single = load_checkpoint(list_checkpoints(runs / "file")[-1])
    assert set(state["model"]) == set(single["model"]) and set(state["ema"]) == set(single["model"])
    for k, v in single["model"].items():
        assert state["model"][k].shape == v.shape, k
    assert state["optimizer"]["param_groups"][0]["params"] == single["optimizer"]["param_groups"][0]["params"]


def test_resume_under_the_same_layout_is_exact(runs):
    want = final_state(runs / "fsdp")
    assert_states_equal(final_state(runs / "fsdp_resumed"), want, "FSDP resumed from a sharded checkpoint")
    # A single-file checkpoint (gathered on rank 0) read by a run that writes sharded ones.
    assert list_checkpoints(runs / "file")[-1].name == "step_0000002.pt"
    assert_states_equal(final_state(runs / "from_file"), want, "FSDP resumed from a file checkpoint")


@pytest.mark.parametrize("name", ["ep_resumed", "ep_fsdp_resumed"])
def test_resume_under_expert_parallelism(runs, name):
    # Written by the expert-parallel run itself: its experts' slices went into the global tensors.
    assert list_checkpoints(runs / name)[-1].name == "step_0000004.dcp"
    assert_states_close(final_state(runs / name), final_state(runs / "fsdp"), name)


def test_resume_in_one_process(runs, tmp_path):
    source = runs / "fsdp" / "checkpoints" / "step_0000002.dcp"
    # One process accumulating over the 2 ranks' micro-batches: the same per-process balance losses.
    tr = Trainer(train_config(tmp_path / "one", steps=STEPS, micro_batch=GLOBAL_BATCH // WORLD, resume=str(source)),
                 model_overrides(ALPHA))
    assert tr.step == RESUME_AT and tr.checkpoint_format == "file"  # auto: one process writes a file
    instrument(tr)
    tr.run()
    got = {"model": tr.model.state_dict(), "ema": tr.ema.state_dict(), "optimizer": tr.optimizer.state_dict()}
    assert_states_close(got, final_state(runs / "fsdp"), "one process resumed from a sharded checkpoint")


def test_convert_sharded_folder_to_one_file(runs, tmp_path, capsys):
    src = runs / "fsdp" / "checkpoints" / "step_0000004.dcp"
    out = tmp_path / "model.safetensors"
    assert main(["convert", str(src), str(out)]) == 0
    converted, exported = load_model(out), load_model(runs / "fsdp" / "model_ema.safetensors")
    # model_ema.safetensors: the run's EMA at step 4, gathered on rank 0; the same numbers.
    want = exported.state_dict()
    assert set(converted.state_dict()) == set(want)
    for k, v in converted.state_dict().items():
        assert torch.equal(v, want[k]), k
    gen = torch.Generator().manual_seed(0)
    channels = exported.config.in_channels
    x, t, y = torch.randn(3, channels, 8, 8, generator=gen), torch.rand(3, generator=gen), torch.tensor([0, 3, 10])
    with torch.no_grad():
        assert torch.equal(converted(x, t, y), exported(x, t, y))
    # The folder is also what sample / convert read directly, and the other output formats work.
    assert main(["convert", str(src), str(tmp_path / "official.safetensors"), "--to", "official"]) == 0


def test_init_from_sharded_folder(runs, tmp_path):
    src = runs / "fsdp" / "checkpoints" / "step_0000004.dcp"
    tr = Trainer(train_config(tmp_path / "new", init_from=str(src)), model_overrides(ALPHA))
    assert tr.step == 0 and "sharded training checkpoint (step 4, ema weights)" in tr.init_report.kind
    want = load_model(runs / "fsdp" / "model_ema.safetensors").state_dict()
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_damaged_folders_are_reported_by_name(runs, tmp_path, capsys):
    good = runs / "fsdp" / "checkpoints" / "step_0000004.dcp"
    for damage in ("missing shard", "truncated shard", "no metadata"):
        bad = tmp_path / damage.replace(" ", "_") / "step_0000004.dcp"
        shutil.copytree(good, bad)
        if damage == "missing shard":
            (bad / "__1_0.distcp").unlink()
        elif damage == "truncated shard":
            shard = bad / "__1_0.distcp"
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
        else:
            (bad / ".metadata").unlink()
        assert main(["convert", str(bad), str(tmp_path / "x.safetensors")]) == 2, damage
        err = capsys.readouterr().err
        assert f"sharded checkpoint {bad} is incomplete or damaged" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
        with pytest.raises(ValueError, match="incomplete or damaged"):
            Trainer(train_config(tmp_path / damage.replace(" ", "_") / "resumed", steps=STEPS, resume=str(bad)),
                    model_overrides(ALPHA))


def make_checkpoints(ckpt: Path, names: list[str]) -> None:
    """Stand-ins: a file for step_N.pt, a complete folder (its two last-written files) for step_N.dcp."""
    ckpt.mkdir(parents=True)
    for name in names:
        if name.endswith(".pt"):
            (ckpt / name).write_bytes(b"x")
        else:
            (ckpt / name).mkdir()
            (ckpt / name / ".metadata").write_bytes(b"x")
            (ckpt / name / "train_state.pt").write_bytes(b"x")


def test_listing_and_pruning_treat_both_kinds_alike(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    make_checkpoints(ckpt, ["step_0000001.pt", "step_0000002.dcp", "step_0000003.pt", "step_0000004.dcp"])
    (ckpt / ".step_0000005.dcp.tmp").mkdir()  # a write killed before its rename
    (ckpt / "step_0000006.dcp").mkdir()  # a copy without the files written last
    (ckpt / "step_0000006.dcp" / "__0_0.distcp").write_bytes(b"x")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == [
        "step_0000001.pt", "step_0000002.dcp", "step_0000003.pt", "step_0000004.dcp"]
    prune(tmp_path / "run", 2)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000003.pt", "step_0000004.dcp"]
    assert (ckpt / ".step_0000005.dcp.tmp").is_dir()  # only a trainer holding the folder's lock removes it


def test_killed_sharded_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    """One process (no process group) writes sharded checkpoints too; a write that dies midway
    leaves its temporary folder, the previous checkpoint stays the newest, and the next trainer
    cleans up and resumes from it."""
    from ditmoe.parallel import sharded

    tr = Trainer(train_config(tmp_path, steps=2, checkpoint_format="sharded"), model_overrides(ALPHA))
    tr.run()
    good = list_checkpoints(tmp_path)
    assert [p.name for p in good] == ["step_0000002.dcp"]
    real_save = sharded.save_sharded

    def dies_midway(folder, *args):
        real_save(folder, *args)
        (Path(folder) / ".metadata").unlink()  # as if killed before DCP's last write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sharded, "save_sharded", dies_midway)
    tr.step = 3
    with pytest.raises(RuntimeError, match=r"No space left on device.*step_0000002.dcp is intact"):
        tr.save()
    monkeypatch.undo()
    ckpt = tmp_path / "checkpoints"
    assert list_checkpoints(tmp_path) == good and not list(ckpt.glob(".*.tmp"))
    # A write killed outright (no exception handler ran) leaves the temporary folder; it is ignored and removed.
    (ckpt / ".step_0000003.dcp.tmp").mkdir()
    resumed = Trainer(train_config(tmp_path, steps=3, checkpoint_format="sharded", resume="auto"), model_overrides(ALPHA))
    assert resumed.step == 2 and not (ckpt / ".step_0000003.dcp.tmp").exists()
    resumed.run()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002.dcp", "step_0000003.dcp"]


def test_auto_format_rule():
    big, small = 17 * 10**9, 15 * 10**9  # bytes of weights + EMA + AdamW state; the default threshold is 16 GB
    assert choose_format("auto", "fsdp", 8, big, 16.0) == "sharded"
    assert choose_format("auto", "ep_fsdp", 8, big, 16.0) == "sharded"
    assert choose_format("auto", "ep", 8, big, 16.0) == "sharded"
    assert choose_format("auto", "fsdp", 8, small, 16.0) == "file"
    assert choose_format("auto", "fsdp", 1, big, 16.0) == "file"  # one process: nothing to gather
    assert choose_format("auto", "ddp", 8, big, 16.0) == "file"  # every rank holds everything
    assert choose_format("sharded", "none", 1, small, 16.0) == "sharded"
    assert choose_format("file", "fsdp", 8, big, 16.0) == "file"


def test_train_flags():
    from ditmoe.cli import build_parser
    from ditmoe.cli.train import train_config_from_args

    args = build_parser().parse_args(["train", "--checkpoint-format", "sharded", "--sharded-above-gb", "4"])
    cfg, _ = train_config_from_args(args)
    assert cfg.checkpoint_format == "sharded" and cfg.sharded_above_gb == 4.0
    with pytest.raises(ValueError, match="checkpoint_format sharded is not supported with the DeepSpeed"):
        train_config(Path("unused"), parallel="zero3", checkpoint_format="sharded").validate()
