#!/usr/bin/env bash
""":"
# SFT / distillation on Megatron-Core; default: a tiny Qwen2 on the built-in task (CPU).
#   bash examples/sft_distill.sh [key=value ...]              # NPROC ranks here (default 1)
#   torchrun --nproc-per-node 8 examples/sft_distill.sh [key=value ...]   # or --no-python, or
#   torchrun --nnodes N --node-rank I --rdzv-backend c10d --rdzv-endpoint HOST:PORT ... (slurm/)
#   RECIPE=examples/recipes/qwen2.5_7b/sft_distill.yaml torchrun --nproc-per-node 8 examples/sft_distill.sh
# Bash and Python read this file: torchrun runs it with Python, which hands it to bash.
NPROC=${NPROC:-1} ENTRY=openr1_mega.train.sft
DEFAULT_RECIPE=examples/recipes/tiny/sft.yaml TINY=qwen2:outputs/tiny-qwen2
source "$(dirname "$0")/_launch.sh"  # execs the job: bash stops here
: <<'#'  # (for `bash -n`: the Python below, up to the lone "#", is a here-document)
":"""
# Python: torchrun ran this file as a script; run it as bash in this same rank process.
import os
import sys

os.environ.setdefault("PY", sys.executable)
os.execvp("bash", ["bash", __file__, *sys.argv[1:]])
#
