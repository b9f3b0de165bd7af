#!/usr/bin/env python
"""Whole-model speed of two versions of this package, side by side: a training step and a short
sampling run of one model in fp32, each version in its own process, rounds alternating which
version goes first; the median per version and the ratio after / before are printed (and, with
--json, written).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/before_after.py --before 3db8c1f --rounds 5

--before / --after name git revisions (checked out into temporary worktrees) or "." (this
working tree, the default for --after). The script itself is the only code both versions share:
it builds the model through `ditmoe.create_model` and, where the version has it,
`ditmoe.kernels.apply` (as the trainer and sampler of that version do).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from ditmoe import create_model
from ditmoe.samplers import sample
try:
    from ditmoe.kernels import apply
except ImportError:  # versions before the speed layers moved out of the model
    apply = lambda m: m
torch.manual_seed(0)
model = apply(create_model(sys.argv[1]))
with torch.no_grad():  # adaLN-Zero starts at zero: give the blocks something to compute
    for n, p in model.named_parameters():
        if "adaLN_modulation" in n or n.startswith("final_layer.linear"):
            p.normal_(std=0.02)
cfg = model.config
batch, steps = int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(1)
x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
t = torch.rand(batch, generator=g) * 999
y = torch.randint(0, cfg.num_classes, (batch,), generator=g)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

def train_step():
    opt.zero_grad(set_to_none=True)
    out, aux = model(x, t, y, return_aux=True)
    ((out[:, :cfg.in_channels] - x).square().mean() + aux.sum()).backward()
    opt.step()

def sampling():
    model.eval()
    sample(model, "flow", "euler", steps, y[:2], 1.5, noise=x[:2])
    model.train()

res = {}
for name, fn, reps in (("train", train_step, 3), ("sample", sampling, 2)):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    res[name] = min(times)
print(json.dumps(res))
"""


def source_tree(rev: str, stack: ExitStack) -> Path:
    if rev == ".":
        return ROOT / "src"
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ditmoe-rev-")))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tmp / "tree"), rev], check=True)
    stack.callback(subprocess.run, ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "tree")])
    return tmp / "tree" / "src"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="git revision of the earlier version")
    p.add_argument("--after", default=".", help='git revision of the later version ("." = this working tree)')
    p.add_argument("--model", default="DiT-MoE-S/2-8E2A")
    p.add_argument("--batch", type=int, default=8, help="images per training step")
    p.add_argument("--sample-steps", type=int, default=5, help="Euler steps (CFG 1.5, 2 images)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if args.rounds < 1 or args.batch < 1 or args.sample_steps < 1 or args.threads < 1:
        p.error("--rounds, --batch, --sample-steps and --threads must be at least 1")
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with ExitStack() as stack:
        trees = {"before": source_tree(args.before, stack), "after": source_tree(args.after, stack)}
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for name in order:
                env = dict(os.environ, PYTHONPATH=str(trees[name]), OMP_NUM_THREADS=str(args.threads))
                proc = subprocess.run([sys.executable, "-c", CHILD, args.model, str(args.batch), str(args.sample_steps),
                                       str(args.threads)], env=env, capture_output=True, text=True)
                if proc.returncode:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"round {r}: {name} {results[name][-1]}", flush=True)
    summary = {}
    for key in ("train", "sample"):
        before = statistics.median(x[key] for x in results["before"])
        after = statistics.median(x[key] for x in results["after"])
        per_round = [a[key] / b[key] for a, b in zip(results["after"], results["before"])]
        summary[key] = {"before_s": before, "after_s": after, "after_over_before": after / before,
                        "per_round": [min(per_round), max(per_round)]}
        print(f"{key}: before {before:.3f} s, after {after:.3f} s, after/before {after / before:.2f} "
              f"(per round {min(per_round):.2f} to {max(per_round):.2f})")
    if args.json:
        from ditmoe.hardware import cpu_info

        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "cpu": cpu_info().as_dict(),
                                         "rounds": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
