"""Build of the torch extension `openr1_mega._C` (metadata lives in pyproject.toml).

    .venv/bin/pip install --no-build-isolation -e .

The CPU kernels (csrc/*.cpp, OpenMP) are always built, with ninja. The CUDA kernels
(csrc/cuda/*.cu) are added when the installed torch is a CUDA build and nvcc exists; then the
extension is compiled for TORCH_CUDA_ARCH_LIST (default: 8.0 and 9.0). No -march=native: the
hot loops are compiled per x86 ISA level and chosen at run time (csrc/common.h), so a wheel
built here runs on any x86-64 CPU. OPENR1_MEGA_NO_EXTENSION=1 skips the extension entirely;
`import openr1_mega.ops` then falls back to the pure-torch references with a warning.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup

CXX_FLAGS = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function"]  # torch picks -std
NVCC_FLAGS = ["-O3", "-lineinfo"]


def _cuda_available() -> bool:
    """True when torch is a CUDA build and nvcc can be found (CUDA_HOME or PATH)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return False
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    return bool((nvcc and os.path.exists(nvcc)) or shutil.which("nvcc"))


def _extensions() -> tuple[list, dict]:
    """The extension list and cmdclass for setup(); empty when the build is switched off."""
    if os.environ.get("OPENR1_MEGA_NO_EXTENSION", "0") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp"))
    kwargs = dict(
        name="openr1_mega._C",
        include_dirs=[os.path.abspath("csrc")],
        extra_link_args=["-fopenmp"],
    )
    if _cuda_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            sources=sources + sorted(glob.glob("csrc/cuda/*.cu")),
            define_macros=[("OPENR1_MEGA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            **kwargs,
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": CXX_FLAGS}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
