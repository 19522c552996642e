#!/usr/bin/env bash
# The single-GPU check, for the day a GPU is at hand: one H100/H200 whose Python has a CUDA
# torch, triton, transformers and nvcc, but neither vLLM, Transformer Engine nor megatron-core,
# and no network. Budget: under 8 minutes.
#   make gpu-wheels                            # beforehand, with network: fills wheels/
#   bash tools/gpu_smoke.sh [results.json]     # default: $OUT/gpu_smoke.json, else ./
# Stages (each timed and logged; a failed stage is recorded and the next one still runs):
#   install    megatron-core, pytest, ninja, cmake from wheels/ (--no-index: nothing fetched)
#   extension  setup.py build_ext --inplace: CPU + CUDA kernels for this GPU's architecture
#   ctest      the CMake kernel library and ctest's cuda_kernels test (CUDA vs CPU kernels)
#   pytest     tests/gpu (marker gpu): kernels vs CPU kernels and pure-torch references,
#              opcheck on CUDA, the train-step checks
#   bench      tools/bench_kernels.py --device cuda: token_logprob bandwidth vs a device copy
#   steps      tools/gpu_step_check.py --device cuda: one SFT and one GRPO step (small Qwen2,
#              pre-made completions, no vLLM): step time, peak memory, checks
# Then ONE JSON with the device, every stage's status and seconds, and the numbers above.
# Exit status: 0 when every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULT=${1:-${OUT:-.}/gpu_smoke.json}
PY=${PY:-python3}
WORK=$(mktemp -d)
CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || {
  echo "torch sees no CUDA device"; exit 1; }
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH PYTHONPATH=$PWD PYTHONWARNINGS=ignore OMP_NUM_THREADS=8
export CAP TORCH_CUDA_ARCH_LIST=$CAP MAX_JOBS=${MAX_JOBS:-16}

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $WORK/NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s%N)
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - start) / 1000000 ))" \
    >> "$WORK/stages.tsv"
  echo "[$name] exit $rc"
  [ "$rc" -eq 0 ] || tail -n 40 "$WORK/$name.log"
}

cmake_ctest() {
  cmake -S . -B build/cmake-gpu -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES="${CAP/./}" &&
    cmake --build build/cmake-gpu -j "$MAX_JOBS" &&
    ctest --test-dir build/cmake-gpu -R cuda_kernels --output-on-failure --no-tests=error
}
export -f cmake_ctest

stage install 120 "$PY" -m pip install --no-index --find-links wheels \
  megatron-core==0.16.1 pytest ninja cmake
stage extension 300 "$PY" setup.py build_ext --inplace
stage ctest 240 bash -c cmake_ctest
stage pytest 300 "$PY" -m pytest tests/gpu -m gpu -q -p no:cacheprovider \
  --junitxml "$WORK/pytest.xml"
stage bench 180 "$PY" tools/bench_kernels.py --device cuda --no-compile --repeats 5 \
  --out "$WORK/kernels.json"
stage steps 240 "$PY" tools/gpu_step_check.py --device cuda --size small --out "$WORK/steps.json"

mkdir -p "$(dirname "$RESULT")"
"$PY" - "$WORK" "$RESULT" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

import torch

work, result = Path(sys.argv[1]), Path(sys.argv[2])
def load(name):
    path = work / name
    return json.loads(path.read_text()) if path.exists() else None
stages = {}
for line in (work / "stages.tsv").read_text().splitlines():
    name, rc, ms = line.split("\t")
    stages[name] = {"ok": rc == "0", "exit": int(rc), "seconds": int(ms) / 1000,
                    "log_tail": (work / f"{name}.log").read_text()[-1500:]}
tests = None
if (work / "pytest.xml").exists():
    suite = ET.parse(work / "pytest.xml").getroot().find("testsuite")
    tests = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
ctest = [l for l in (work / "ctest.log").read_text().splitlines() if "tests passed" in l]
kernels, steps = load("kernels.json"), load("steps.json")
report = {
    "device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
    "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
    "ok": all(s["ok"] for s in stages.values()), "stages": stages, "gpu_tests": tests,
    "ctest": ctest[-1] if ctest else None,
    "token_logprob_bandwidth": kernels and kernels["token_logprob"].get("bandwidth"),
    "token_logprob_config": kernels and kernels["token_logprob"]["config"],
    "kernels": kernels and {op: kernels[op]["ratios"] for op in ("token_logprob",
                                                                 "grpo_advantage")},
    "train_steps": steps,
}
result.write_text(json.dumps(report, indent=2) + "\n")
print(f"wrote {result}: ok={report['ok']}")
sys.exit(0 if report["ok"] else 1)
EOF
