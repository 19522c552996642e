#!/usr/bin/env bash
# GRPO on a Mixture-of-Experts model. On this CPU machine: a tiny Qwen3-MoE with EP=2.
#   NPROC=2 bash examples/grpo_moe.sh                       # tiny, CPU, gloo
#   NPROC=8 RECIPE=examples/recipes/qwen3_30b_a3b/grpo.yaml bash examples/grpo_moe.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
RECIPE=${RECIPE:-examples/recipes/tiny/grpo_moe.yaml}
PY=${PY:-.venv/bin/python}
if [ "$RECIPE" = examples/recipes/tiny/grpo_moe.yaml ]; then
  $PY tools/make_tiny_model.py --arch qwen3_moe --out outputs/tiny-qwen3-moe
fi
exec "$(dirname "$PY")/torchrun" --standalone --nproc_per_node "$NPROC" \
  -m openr1_mega.train.grpo --recipe "$RECIPE" "$@"
