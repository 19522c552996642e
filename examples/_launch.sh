# Sourced by the examples/*.sh launchers, which set ENTRY (the Python module), NPROC's
# default, DEFAULT_RECIPE and TINY ("arch:dir" of the tiny model DEFAULT_RECIPE reads).
# Already one rank of a job (torchrun set LOCAL_RANK; srun started more than one task):
# exec the entry. Otherwise start NPROC ranks on this machine with torchrun.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RECIPE=${RECIPE:-$DEFAULT_RECIPE}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
if [ "$RECIPE" = "$DEFAULT_RECIPE" ]; then  # made once; the lock serialises the ranks
  mkdir -p outputs
  flock outputs/.make_tiny_model.lock \
    "$PY" tools/make_tiny_model.py --arch "${TINY%%:*}" --out "${TINY#*:}" >/dev/null
fi
if [ -n "${LOCAL_RANK:-}" ] || [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
  exec "$PY" -m "$ENTRY" --recipe "$RECIPE" "$@"
fi
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  -m "$ENTRY" --recipe "$RECIPE" "$@"
