#!/usr/bin/env bash
# Tiny Shakespeare, character level, nanoGPT's CPU shape (4 layers, 4 heads, 128 dims, context 64,
# batch 12, 2000 iterations, no dropout): ternary vs its FP twin, each at its best LR of the sweep,
# plus both readings of "equal weight bytes": the widest FP model that fits in the ternary model's
# packed bytes, and the widest ternary model that fits in the FP twin's fp16 bytes (its own, shorter
# LR sweep: it costs ~4x the compute per step). Validation loss is over the whole validation split.
# Results: runs/bench-shakespeare/compare.{md,json,png}. ~70 min on one quiet core.
set -euo pipefail
cd "$(dirname "$0")/.."
LRS=${LRS:-1e-3,2e-3,3e-3,5e-3}
WIDE_LRS=${WIDE_LRS:-2e-3,3e-3}
SCHEDULE=${SCHEDULE:-two-stage}   # the run recorded first on 2026-11-23 used SCHEDULE=cosine
.venv/bin/python -m tritlm compare --preset tiny --max-steps 2000 --batch-size 12 --block-size 64 \
  --lrs "$LRS" --equal-bytes --wide-ternary --wide-lrs "$WIDE_LRS" --threads "${THREADS:-1}" \
  --eval-interval 250 --quiet \
  --set optim.schedule="$SCHEDULE" --set optim.wd_schedule="$([ "$SCHEDULE" = two-stage ] && echo two-stage || echo constant)" \
  --set ckpt_interval=2000 --set tensorboard=false --out "${OUT:-runs/bench-shakespeare}" "$@"
