#!/usr/bin/env bash
# The main job: train a small DiT-MoE on the embedded MNIST, sample a 10x10 grid (one row per
# class), evaluate it, analyse which experts fire, and gather it all in OUT/report.html.
#   bash scripts/quickstart.sh [OUT]        (default OUT: runs/quickstart)
# Safe to run twice: training resumes from (or stops at) the last checkpoint in OUT.
set -euo pipefail
# sample and analyze use the sampler, steps and guidance scale that configs/mnist.yaml records with the run.
cd "$(dirname "$0")/.."
OUT=${1:-runs/quickstart}
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
start=$(date +%s)

ditmoe train --config configs/mnist.yaml --out "$OUT" --resume auto
ditmoe sample --ckpt "$OUT/model_ema.safetensors" --out "$OUT/samples" --classes all --per-class 10 --seed 0
# 1000 samples for the evaluation: FID against the MNIST test set on the features of a small MNIST
# classifier (trained once and cached), and how often that classifier sees the requested class.
# 1000 real training images give the floor of that FID at the same sample count.
ditmoe sample --ckpt "$OUT/model_ema.safetensors" --out "$OUT/eval_samples" --classes all --per-class 100 \
    --seed 1 --max-grid 100
ditmoe eval --samples "$OUT/eval_samples/samples.npz" --ref mnist --out "$OUT/eval.json"
python -m ditmoe.data.real_subset --n 1000 --out "$OUT/real_1000.npz"
ditmoe eval --samples "$OUT/real_1000.npz" --ref mnist --out "$OUT/eval_real_floor.json"
ditmoe analyze --ckpt "$OUT/model_ema.safetensors" --out "$OUT/analysis" --per-class 10

# One self-contained page with all of the above (settings, curves, expert load, grid, FID, findings).
ditmoe report "$OUT"

echo "quickstart finished in $(( ($(date +%s) - start) / 60 )) min; outputs in $OUT:"
echo "  open first: $OUT/report.html   (one page: settings, curves, expert load, samples, eval, routing)"
echo "  samples/grid.png   eval.json (real-data floor: eval_real_floor.json)   analysis/report.md"
echo "  metrics.csv   expert_load.csv   model_ema.safetensors   checkpoints/"
