#!/usr/bin/env bash
""":"
# GRPO on a dense model; default: a tiny Qwen2 with TP=2 on two gloo ranks (CPU).
#   bash examples/grpo_dense.sh [key=value ...]              # NPROC ranks here (default 2)
#   torchrun --nproc-per-node 8 examples/grpo_dense.sh [key=value ...]   # or --no-python, or
#   torchrun --nnodes N --node-rank I --rdzv-backend c10d --rdzv-endpoint HOST:PORT ... (slurm/)
#   RECIPE=examples/recipes/qwen2.5_7b/grpo.yaml torchrun --nproc-per-node 8 examples/grpo_dense.sh
# Bash and Python read this file: torchrun runs it with Python, which hands it to bash.
NPROC=${NPROC:-2} ENTRY=openr1_mega.train.grpo
DEFAULT_RECIPE=examples/recipes/tiny/grpo_dense.yaml TINY=qwen2:outputs/tiny-qwen2
source "$(dirname "$0")/_launch.sh"  # execs the job: bash stops here
: <<'#'  # (for `bash -n`: the Python below, up to the lone "#", is a here-document)
":"""
# Python: torchrun ran this file as a script; run it as bash in this same rank process.
import os
import sys

os.environ.setdefault("PY", sys.executable)
os.execvp("bash", ["bash", __file__, *sys.argv[1:]])
#
