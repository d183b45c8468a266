"""Build of the compiled extension ``htsat_kernels._C`` (package metadata lives in pyproject.toml).

    pip install --no-build-isolation -e .        # or
    python setup.py build_ext --inplace

Knobs (environment variables):
  HTSAT_KERNELS_SKIP_CUDA=1            build the C++ CPU kernels only, even where nvcc is present
  HTSAT_KERNELS_CUDA_ARCHS="8.0;9.0"   compute capabilities of the CUDA part (default "8.0;9.0");
                                       "9.0" -> -gencode arch=compute_90,code=sm_90, "9.0+PTX" adds PTX
  MAX_JOBS=N                           parallel compile jobs (ninja)
  CUDA_HOME                            the CUDA toolkit (default: found from nvcc on PATH)
  HTSAT_KERNELS_REQUIRE_CUDA=1         fail instead of building CPU-only when the CUDA part cannot be built

The C++ CPU part is always built; the CUDA part when a CUDA toolkit with nvcc is found whose major version
matches the CUDA version torch was built with (a CPU-only torch builds the CPU part only).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home(torch_guess: str | None) -> str | None:
    """A CUDA toolkit directory holding bin/nvcc and include/cuda_runtime.h, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), torch_guess]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc may be a wrapper script or a symlink: also try the directory it really lives in.
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                m = re.search(rb"(/\S+)/bin/nvcc", head)
                if m:
                    candidates.append(m.group(1).decode())
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def _gencode_flags(spec: str) -> list[str]:
    """ "8.0;9.0+PTX" -> ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90", ...]."""
    flags = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        arch = item[: -len("+PTX")] if ptx else item
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", arch)
        if not m:
            sys.exit(f"HTSAT_KERNELS_CUDA_ARCHS: cannot parse {item!r} (expected e.g. '8.0;9.0' or '9.0+PTX')")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        sys.exit("HTSAT_KERNELS_CUDA_ARCHS is empty")
    return flags


def _nvcc_release(cuda_home: str) -> str | None:
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _cuda_toolkit(torch_guess: str | None) -> tuple[str | None, str]:
    """(CUDA_HOME to build the CUDA part with, or None; why not, when None)."""
    import torch

    if _flag("HTSAT_KERNELS_SKIP_CUDA"):
        return None, "HTSAT_KERNELS_SKIP_CUDA is set"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a build without CUDA"
    home = _find_cuda_home(torch_guess)
    if home is None:
        return None, "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    release = _nvcc_release(home)
    if release is not None and release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return None, (
            f"nvcc in {home} is CUDA {release} but torch was built with CUDA {torch.version.cuda}; "
            "point CUDA_HOME at a toolkit of the same major version"
        )
    return home, ""


def _extensions():
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    include_dirs = [os.path.join(ROOT, CSRC)]
    cxx_flags = ["-O3", "-fopenmp"]  # at::parallel_for needs OpenMP in this translation unit
    link_flags = ["-fopenmp"]
    cuda_home, why = _cuda_toolkit(cpp_extension.CUDA_HOME)
    if cuda_home is None:
        if _flag("HTSAT_KERNELS_REQUIRE_CUDA"):
            sys.exit(f"htsat_kernels: HTSAT_KERNELS_REQUIRE_CUDA is set but the CUDA part cannot be built: {why}")
        print(f"htsat_kernels: building the C++ CPU kernels only ({why})")
        return [
            cpp_extension.CppExtension(
                "htsat_kernels._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
            )
        ]
    # cpp_extension reads its module-level CUDA_HOME when it builds include/library paths and runs nvcc.
    cpp_extension.CUDA_HOME = cuda_home
    archs = os.environ.get("HTSAT_KERNELS_CUDA_ARCHS", "8.0;9.0")
    gencode = _gencode_flags(archs)
    print(f"htsat_kernels: building C++ CPU + CUDA kernels (CUDA_HOME={cuda_home}, archs {archs})")
    sources += sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    nvcc_flags = ["-O3", "-DHTSAT_WITH_CUDA=1", *gencode]
    return [
        cpp_extension.CUDAExtension(
            "htsat_kernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DHTSAT_WITH_CUDA=1"], "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
