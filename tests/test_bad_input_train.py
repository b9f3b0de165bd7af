"""`ditmoe train` given what a careless or hostile user gives it: each mistake gets one clear error
line (exit 2) naming the problem and the fix before any work starts, and nothing already on disk
is lost or mixed up."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditmoe.cli import build_parser, main
from ditmoe.cli.train import train_config_from_args
from ditmoe.train import checkpoint as ckpt_mod
from ditmoe.train.checkpoint import list_checkpoints, load_checkpoint

TINY = ["--model", "debug", "--model-input-size", "8", "--data", "digits", "--global-batch", "8",
        "--progress", "false", "--precision", "fp32"]


def train(out, *extra, steps=2):
    return main(["train", *TINY, "--steps", str(steps), "--log-every", "1", "--ckpt-every", "1",
                 "--out", str(out), *extra])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes: what a refused command must leave alone."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def csv_steps(path: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2 (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train(out) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


# ------------------------------------------------------------------ one run per folder
def test_new_run_into_an_existing_run_is_refused(run_copy, capsys):
    (run_copy / "notes.txt").write_text("my notes")
    before = snapshot(run_copy)
    assert train(run_copy, steps=3) == 2
    err = capsys.readouterr().err
    assert "already holds a training run (checkpoints/step_0000001.pt" in err
    assert "--resume auto" in err and "--overwrite true" in err
    assert snapshot(run_copy) == before
    # Starting from a checkpoint of another folder would mix the runs just the same.
    other = run_copy.parent / "other"
    shutil.copytree(run_copy, other)
    assert train(run_copy, "--resume", str(other / "checkpoints" / "step_0000001.pt"), steps=3) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert snapshot(run_copy) == before


def test_overwrite_replaces_only_the_old_run(run_copy, capsys):
    (run_copy / "notes.txt").write_text("my notes")
    old_ema = (run_copy / "model_ema.safetensors").read_bytes()
    assert train(run_copy, "--overwrite", "true", "--ckpt-every", "0", steps=1) == 0
    assert "deleted the previous run's" in capsys.readouterr().out
    # Only the new run's files: its one checkpoint, which the summary names, and its own log rows.
    assert [p.name for p in list_checkpoints(run_copy)] == ["step_0000001.pt"]
    summary = json.loads((run_copy / "train_summary.json").read_text())
    assert Path(summary["checkpoint"]).exists() and summary["steps"] == 1
    assert csv_steps(run_copy / "metrics.csv") == [1]
    assert (run_copy / "model_ema.safetensors").read_bytes() != old_ema
    assert (run_copy / "notes.txt").read_text() == "my notes"
    # ... and the new run continues as itself.
    assert train(run_copy, "--resume", "auto", "--ckpt-every", "0", steps=2) == 0
    assert [p.name for p in list_checkpoints(run_copy)] == ["step_0000001.pt", "step_0000002.pt"]


def test_overwrite_and_resume_auto_contradict(tmp_path, capsys):
    assert train(tmp_path / "run", "--overwrite", "true", "--resume", "auto") == 2
    assert "contradict" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_second_trainer_on_one_folder_is_stopped_and_a_killed_one_does_not_block(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from ditmoe.train.rundir import RunLock; "
         "lock = RunLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train(out) == 2
        err = capsys.readouterr().err
        assert f"is in use by another `ditmoe train` (pid {holder.pid} on host" in err
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops its flock
        holder.wait()
    assert train(out, steps=1) == 0
    assert [p.name for p in list_checkpoints(out)] == ["step_0000001.pt"]


def test_temporary_files_of_a_killed_write_are_removed_on_the_next_start(run_copy):
    orphans = [run_copy / "checkpoints" / ".step_0000003.pt.k2j4x.tmp", run_copy / ".model_ema.safetensors.a8f.tmp"]
    for p in orphans:
        p.write_bytes(b"half a checkpoint")
    mine = run_copy / ".my_editor_file.tmp"
    mine.write_text("not the trainer's")
    assert train(run_copy, "--resume", "auto", steps=3) == 0
    assert not any(p.exists() for p in orphans)
    assert mine.read_text() == "not the trainer's"


def test_resume_drops_log_rows_after_the_checkpoint(run_copy):
    # Killed after step 2 was logged but before its checkpoint landed, mid-way through a row.
    (run_copy / "checkpoints" / "step_0000002.pt").unlink()
    with open(run_copy / "metrics.csv", "a") as f:
        f.write("3,0.02,1.7")
    assert train(run_copy, "--resume", "auto", steps=3) == 0
    assert csv_steps(run_copy / "metrics.csv") == [1, 2, 3]
    loads = csv_steps(run_copy / "expert_load.csv")
    assert loads == [1, 1, 2, 2, 3, 3]  # two MoE layers per step, each step once


def test_resume_auto_after_a_kill_before_the_first_checkpoint_starts_the_logs_over(run_copy, capsys):
    for name in ("checkpoints", "model_ema.safetensors", "model_ema.json", "train_summary.json"):
        p = run_copy / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert train(run_copy, "--resume", "auto", "--grad-clip", "1.0", steps=1) == 0
    assert "no checkpoint in" in capsys.readouterr().out
    assert csv_steps(run_copy / "metrics.csv") == [1]
    assert "grad_norm" in (run_copy / "metrics.csv").read_text().splitlines()[0]  # a new header for the new run


# ------------------------------------------------------------------ numbers
def test_zero_intervals_mean_only_at_the_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "3", "--ckpt-every", "0", "--log-every", "0", "--out", str(out)]) == 0
    assert [p.name for p in list_checkpoints(out)] == ["step_0000003.pt"]
    assert csv_steps(out / "metrics.csv") == [3]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "0 = only the one always written at the end" in flat and "0 = one row, at the end" in flat


@pytest.mark.parametrize("flags,expected", [
    (["--steps", "0"], "steps must be >= 1, got 0"),
    (["--steps", "-5"], "steps must be >= 1, got -5"),
    (["--global-batch", "0"], "global_batch must be >= 1, got 0"),
    (["--micro-batch", "-1"], "micro_batch must be >= 0, got -1"),
    (["--micro-batch", "64"], "micro_batch 64 is larger than global_batch 8"),
    (["--lr", "0"], "lr must be in (0, 1]"),
    (["--lr", "nan"], "lr must be a finite number, got nan"),
    (["--lr", "30"], "lr must be in (0, 1]"),
    (["--keep-last", "0"], "keep_last must be >= 1, got 0"),
    (["--ckpt-every", "-1"], "ckpt_every must be >= 0, got -1"),
    (["--log-every", "-1"], "log_every must be >= 0, got -1"),
    (["--ema-decay", "1.5"], "ema_decay must be in [0, 1), got 1.5"),
    (["--warmup-steps", "-10"], "warmup_steps must be >= 0"),
    (["--seed", "-1"], "seed must be in [0, 2^32), got -1"),
    (["--num-workers", "-2"], "num_workers must be >= 0"),
    (["--steps", "10000000000"], "more than 10^9 optimizer steps"),
    (["--out", ""], "out must name an output folder"),
])
def test_bad_numbers_are_refused_before_anything_starts(tmp_path, capsys, flags, expected):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ditmoe train: error: invalid training config:") and expected in err, err
    assert not out.exists()


# ------------------------------------------------------------------ the output folder
def test_out_that_is_a_file_or_under_a_file(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    assert train(f) == 2
    assert "--out " + str(f) + " is a file, not a folder" in capsys.readouterr().err
    assert train(f / "run") == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    assert f.read_text() == "keep me"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_folder(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert train(out) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        out.chmod(0o755)


def test_failed_checkpoint_write_torch_style_keeps_previous(run_copy, monkeypatch):
    from ditmoe.config import TrainConfig
    from ditmoe.train.loop import Trainer

    good = list_checkpoints(run_copy)[-1]

    def full_disk(obj, path):  # what torch.save raises when the disk fills up mid-write
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4480 vs 4374\n"
                           "frame #0: c10::ThrowEnforceNotMet(...)")

    cfg = TrainConfig(model="debug", data="digits", out=str(run_copy), steps=3, global_batch=8, ckpt_every=1,
                      log_every=1, progress=False, precision="fp32", resume="auto")
    tr = Trainer(cfg, {"input_size": 8})
    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(RuntimeError) as e:
        tr.run()
    msg = str(e.value)
    assert "writing the step-3 checkpoint" in msg and "inline_container.cc" in msg and "frame #0" not in msg
    assert f"{good} is intact" in msg and "Free disk space" in msg and "--resume auto" in msg
    monkeypatch.undo()
    assert list_checkpoints(run_copy)[-1] == good and load_checkpoint(good)["step"] == 2
    assert not [p for p in (run_copy / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert train(run_copy, "--resume", "auto", steps=3) == 0  # the failed run gave its lock up


def test_checkpoint_and_weights_have_the_usual_file_mode(finished_run):
    umask = os.umask(0)
    os.umask(umask)
    for p in [*list_checkpoints(finished_run), finished_run / "model_ema.safetensors"]:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


# ------------------------------------------------------------------ resuming
def test_resume_from_a_weights_file_names_the_checkpoint_to_give(run_copy, capsys):
    before = snapshot(run_copy)
    assert train(run_copy, "--resume", str(run_copy / "model_ema.safetensors"), steps=3) == 2
    err = capsys.readouterr().err
    assert "is not a training checkpoint" in err and "weights file" in err
    assert "RUN/checkpoints/step_N.pt" in err and "--resume auto" in err
    torch.save({"model": {}}, run_copy.parent / "weights.pt")
    assert train(run_copy, "--resume", str(run_copy.parent / "weights.pt"), steps=3) == 2
    assert "is not a training checkpoint" in capsys.readouterr().err
    assert train(run_copy, "--resume", str(run_copy / "checkpoints" / "step_9.pt"), steps=3) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "step_0000002.pt" in err
    assert train(run_copy, "--resume", str(run_copy), steps=3) == 2
    assert "is a folder, not a checkpoint" in capsys.readouterr().err
    assert snapshot(run_copy) == before


def test_resume_auto_without_a_checkpoint_says_it_starts_fresh(tmp_path, capsys):
    out = tmp_path / "typo"
    assert train(out, "--resume", "auto", steps=1) == 0
    assert f"--resume auto: no checkpoint in {out / 'checkpoints'}; starting a new run at step 0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "where there is none, a new run starts and says so" in " ".join(capsys.readouterr().out.split())


def test_resume_auto_does_not_replace_a_finished_run_without_checkpoints(run_copy, capsys):
    shutil.rmtree(run_copy / "checkpoints")  # e.g. deleted to save space; the EMA weights are the result
    before = snapshot(run_copy)
    assert train(run_copy, "--resume", "auto", steps=3) == 2
    err = capsys.readouterr().err
    assert "holds a finished run (model_ema.safetensors, train_summary.json) but no checkpoint" in err
    assert "--overwrite true" in err
    assert snapshot(run_copy) == before


def test_resume_with_another_process_names_the_process(run_copy, capsys):
    assert train(run_copy, "--resume", "auto", "--process", "ddpm", steps=3) == 2
    err = capsys.readouterr().err
    assert "process='flow' but this run has process='ddpm'" in err and "--process flow" in err
    assert "timestep_scale" not in err


@pytest.mark.parametrize("layout", ["ddp", "fsdp", "ep", "ep_fsdp", "zero2", "zero3"])
def test_parallel_layout_outside_torchrun_says_how_to_launch(tmp_path, capsys, monkeypatch, layout):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert train(tmp_path / "run", "--parallel", layout) == 2
    err = capsys.readouterr().err
    assert f"torchrun --standalone --nproc_per_node 2 -m ditmoe train --parallel {layout}" in err
    assert "RANK is not set" in err and "--parallel none" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ config files
@pytest.mark.parametrize("text,expected", [
    ("steps: [1, 2\n", "is not valid YAML at line 2"),
    ("steps: 3\n  lr: 0.1\n", "is not valid YAML at line 2"),
    ('steps: "five"\n', "steps = 'five' (str) is not valid; steps must be an integer"),
    ("lr: fast\n", "lr = 'fast' (str) is not valid; lr must be a number"),
    ("flip: maybe\n", "flip = 'maybe' (str) is not valid; flip must be true or false"),
    ("model_overrides:\n  num_experts: many\n", "model_overrides: num_experts = 'many'"),
    ("model_overrides: 8\n", "model_overrides must be a mapping"),
    ("- steps: 3\n", "must hold a mapping of option: value"),
    ("stepz: 3\n", "unknown training option(s) ['stepz']"),
])
def test_bad_config_file_names_key_value_and_type(tmp_path, capsys, text, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"config file {cfg}" in err and expected in err, err
    assert not (tmp_path / "run").exists()


def test_bad_toml_and_yaml_number_spellings(tmp_path, capsys):
    bad = tmp_path / "c.toml"
    bad.write_text("steps = \n")
    assert main(["train", "--config", str(bad)]) == 2
    assert f"config file {bad} is not valid TOML" in capsys.readouterr().err
    good = tmp_path / "ok.yaml"
    good.write_text("lr: 1e-4\nsteps: 10.0\n")  # YAML 1.1 reads 1e-4 as a string
    cfg, _ = train_config_from_args(build_parser().parse_args(["train", "--config", str(good)]))
    assert cfg.lr == 1e-4 and cfg.steps == 10 and isinstance(cfg.steps, int)


# ------------------------------------------------------------------ data
def test_images_smaller_than_the_model_name_the_flag(tmp_path, capsys):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (6, 7), (120, 30, 200)).save(tmp_path / "imgs" / cls / "x.png")
    assert main(["train", "--model", "debug", "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "smaller than the model input 8x8" in err and "at most 6" in err and "--model-input-size N" in err
    assert not list_checkpoints(tmp_path / "run")
