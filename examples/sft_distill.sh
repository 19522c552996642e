#!/usr/bin/env bash
# SFT / distillation on Megatron-Core. On this CPU machine: a tiny Qwen2 on the built-in task.
#   NPROC=2 bash examples/sft_distill.sh parallel.tp=2
#   NPROC=8 RECIPE=examples/recipes/qwen2.5_7b/sft_distill.yaml bash examples/sft_distill.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}
RECIPE=${RECIPE:-examples/recipes/tiny/sft.yaml}
PY=${PY:-.venv/bin/python}
if [ "$RECIPE" = examples/recipes/tiny/sft.yaml ]; then
  $PY tools/make_tiny_model.py --arch qwen2 --out outputs/tiny-qwen2
fi
exec "$(dirname "$PY")/torchrun" --standalone --nproc_per_node "$NPROC" \
  -m openr1_mega.train.sft --recipe "$RECIPE" "$@"
