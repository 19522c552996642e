#!/usr/bin/env bash
# GRPO on a dense model. On this CPU machine: a tiny Qwen2 with TP=2.
#   NPROC=2 bash examples/grpo_dense.sh                     # tiny, CPU, gloo
#   NPROC=8 RECIPE=examples/recipes/qwen2.5_7b/grpo.yaml bash examples/grpo_dense.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
RECIPE=${RECIPE:-examples/recipes/tiny/grpo_dense.yaml}
PY=${PY:-.venv/bin/python}
if [ "$RECIPE" = examples/recipes/tiny/grpo_dense.yaml ]; then
  $PY tools/make_tiny_model.py --arch qwen2 --out outputs/tiny-qwen2
fi
exec "$(dirname "$PY")/torchrun" --standalone --nproc_per_node "$NPROC" \
  -m openr1_mega.train.grpo --recipe "$RECIPE" "$@"
