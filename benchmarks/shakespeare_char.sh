#!/usr/bin/env bash
# Tiny Shakespeare, character level, nanoGPT's CPU shape (4 layers, 4 heads, 128 dims, context 64,
# batch 12, 2000 iterations, no dropout): ternary vs its FP twin, each at its best LR of its own sweep
# (each sweep brackets its optimum: see benchmarks/RESULTS.md), plus both readings of "equal weight
# bytes": the widest FP model that fits in the ternary model's packed bytes, and the widest ternary
# model that fits in the FP twin's fp16 bytes (~5x the compute per step, so a short sweep).
# Validation loss is over the whole validation split. Results: runs/bench-shakespeare/compare.{md,json,png}.
# ~80 min on one quiet core.
set -euo pipefail
cd "$(dirname "$0")/.."
SCHEDULE=${SCHEDULE:-two-stage}   # the run recorded first on 2026-11-23 used SCHEDULE=cosine
.venv/bin/python -m tritlm compare --preset tiny --max-steps 2000 --batch-size 12 --block-size 64 \
  --lrs "${LRS:-1e-3,2e-3,3e-3}" --variant-lrs "fp=${FP_LRS:-2.5e-4,5e-4,1e-3,2e-3}" \
  --equal-bytes --variant-lrs "fp-equal-bytes=${EQ_LRS:-2e-3,4e-3}" \
  --wide-ternary --variant-lrs "ternary-wide=${WIDE_LRS:-5e-4,1e-3,2e-3}" \
  --threads "${THREADS:-1}" --eval-interval 250 --quiet \
  --set optim.schedule="$SCHEDULE" --set optim.wd_schedule="$([ "$SCHEDULE" = two-stage ] && echo two-stage || echo constant)" \
  --set ckpt_interval=2000 --set tensorboard=false --out "${OUT:-runs/bench-shakespeare}" "$@"
