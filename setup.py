"""Build of the compiled extension ``htsat_kernels._C`` (package metadata lives in pyproject.toml).

    pip install --no-build-isolation -e .        # or
    python setup.py build_ext --inplace

The extension is optional: when the C++ or CUDA compile fails, the build still succeeds with a warning
(with the C++ CPU kernels alone when only the CUDA part failed, else without the extension), every op
then runs its PyTorch reference, and ``htsat_kernels.fused_status()`` says why (the build writes its
outcome to htsat_kernels/_C_build.json next to the extension).

Knobs (environment variables):
  HTSAT_KERNELS_REQUIRE_EXT=1          fail the build when the extension (or its CUDA part, when one is
                                       attempted) does not compile; CI sets it
  HTSAT_KERNELS_SKIP_CUDA=1            build the C++ CPU kernels only, even where nvcc is present
  HTSAT_KERNELS_REQUIRE_CUDA=1         fail instead of building CPU-only when no usable CUDA toolkit is found
  TORCH_CUDA_ARCH_LIST="8.0;9.0"       compute capabilities of the CUDA part, in torch's syntax ("9.0+PTX" adds
                                       PTX, named ones such as "Hopper" work too)
  HTSAT_KERNELS_CUDA_ARCHS="9.0"       the same for this package only; overrides TORCH_CUDA_ARCH_LIST
                                       default (neither set): the GPUs visible at build time, else "8.0;9.0",
                                       the newest of them also as PTX (newer GPUs JIT-compile it)
  MAX_JOBS=N                           parallel compile jobs (ninja): each csrc/ file is one job
  CUDA_HOME                            the CUDA toolkit (default: found from nvcc on PATH)
  CXX                                  the C++ compiler (default c++)

The build record's ``cuda_archs`` lists what the CUDA part holds ("sm_90": machine code for compute
capability 9.x, x >= 0; "compute_90": PTX for 9.0 and newer); the ops compare it with the device before
each launch and decline a GPU it cannot run on (htsat_kernels/fused/extension.py).

The CUDA part is built when a CUDA toolkit with nvcc is found whose major version matches the CUDA version
torch was built with (a CPU-only torch builds the CPU part only).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
EXT_NAME = "htsat_kernels._C"
BUILD_INFO = "_C_build.json"  # read by htsat_kernels/fused/extension.py
DEFAULT_ARCHS = "8.0;9.0"  # A100, H100 / H200 (the newest is also built as PTX, see _with_ptx)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(message: str) -> None:
    bar = "=" * 100
    print(f"\n{bar}\nhtsat_kernels: WARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)


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
        if (
            home
            and os.path.isfile(os.path.join(home, "bin", "nvcc"))
            and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
        ):
            return home
    return None


def _gencode_flags(spec: str, source: str) -> list[str]:
    """ "8.0;9.0+PTX" -> ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90", ...]."""
    flags = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        arch = item[: -len("+PTX")] if ptx else item
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", arch)
        if not m:
            raise ValueError(f"{source}: cannot parse {item!r} (expected e.g. '8.0;9.0' or '9.0+PTX')")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise ValueError(f"{source} is empty")
    return flags


def _with_ptx(spec: str) -> str:
    """ "8.0;9.0" -> "8.0;9.0+PTX": the newest architecture of a default list also as PTX, so that a GPU newer
    than any built for JIT-compiles it instead of having no kernel image (explicit lists are kept as given)."""
    items = [i for i in re.split(r"[;,\s]+", spec.strip()) if i]
    if not items or any(i.endswith("+PTX") for i in items):
        return spec
    newest = max(items, key=lambda i: tuple(int(x) for x in re.findall(r"\d+", i)[:2]))
    return ";".join(f"{i}+PTX" if i == newest else i for i in items)


def _archs_of(gencode: list[str]) -> list[str]:
    """-gencode flags -> what the binary holds: ["sm_80", "sm_90", "compute_90"] (machine code, PTX)."""
    archs: list[str] = []
    for flag in gencode:
        m = re.search(r",code=\[?([\w,]+)\]?", flag)
        for code in m.group(1).split(",") if m else []:
            if code not in archs:
                archs.append(code)
    return archs


def _visible_gpu_archs() -> str | None:
    """The compute capabilities of the GPUs visible now ("8.0;9.0"), capped at the newest torch supports."""
    import torch

    try:
        count = torch.cuda.device_count()
        if count == 0:
            return None
        sms = [int(a[3:]) for a in torch.cuda.get_arch_list() if re.fullmatch(r"sm_\d+", a)]  # sm_90 -> 90
        newest = divmod(max(sms), 10) if sms else (99, 9)
        caps = sorted({min(torch.cuda.get_device_capability(i), newest) for i in range(count)})
    except Exception:  # a driver problem: fall back to the documented default
        return None
    return ";".join(f"{major}.{minor}" for major, minor in caps)


def _cuda_arch_flags() -> tuple[list[str], str]:
    """(-gencode flags, a description of where the architectures came from). TORCH_CUDA_ARCH_LIST is
    torch's own syntax (named architectures too), so torch's parser turns it into the flags."""
    own = os.environ.get("HTSAT_KERNELS_CUDA_ARCHS", "").strip()
    if own:
        return _gencode_flags(own, "HTSAT_KERNELS_CUDA_ARCHS"), f"{own} (HTSAT_KERNELS_CUDA_ARCHS)"
    torch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if torch_list:
        from torch.utils import cpp_extension

        try:
            flags = cpp_extension._get_cuda_arch_flags()
        except Exception as exc:  # an arch torch does not know
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: {exc}") from exc
        return flags, f"{torch_list} (TORCH_CUDA_ARCH_LIST)"
    visible = _visible_gpu_archs()
    if visible:
        visible = _with_ptx(visible)
        return _gencode_flags(visible, "visible GPUs"), f"{visible} (the GPUs visible at build time)"
    default = _with_ptx(DEFAULT_ARCHS)
    return _gencode_flags(default, "default"), f"{default} (default: no GPU visible, no arch list set)"


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


# What the build attempts; the build command records the outcome in BUILD_INFO.
# cuda_archs: what the CUDA part holds (["sm_80", "compute_90"]), compared with the device at run time.
PLAN: dict = {"cuda": False, "cuda_archs": None, "cuda_archs_source": None, "cuda_error": None, "error": None}


def _cpu_extension():
    from torch.utils import cpp_extension

    return cpp_extension.CppExtension(
        EXT_NAME,
        sorted(glob.glob(os.path.join(CSRC, "*.cpp"))),
        depends=sorted(glob.glob(os.path.join(CSRC, "*.h"))),  # rebuilt when a header changes; shipped in the sdist
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={"cxx": ["-O3", "-fopenmp"]},  # at::parallel_for needs OpenMP in these translation units
        extra_link_args=["-fopenmp"],
    )


def _make_cpu_only(ext) -> None:
    """Turns the CUDA extension into the C++ CPU one in place: setuptools has finalised the object (a new
    one would lack its private attributes), and BuildExtension adds its own flags again on the next run."""
    cpu = _cpu_extension()
    for attr in ("sources", "depends", "include_dirs", "library_dirs", "libraries", "extra_compile_args", "extra_link_args"):
        setattr(ext, attr, getattr(cpu, attr))


def _extensions():
    from torch.utils import cpp_extension

    cuda_home, why = _cuda_toolkit(cpp_extension.CUDA_HOME)
    gencode: list[str] = []
    if cuda_home is not None:
        try:
            gencode, archs = _cuda_arch_flags()
        except ValueError as exc:
            cuda_home, why = None, str(exc)
    if cuda_home is None:
        if _flag("HTSAT_KERNELS_REQUIRE_CUDA"):
            sys.exit(f"htsat_kernels: HTSAT_KERNELS_REQUIRE_CUDA is set but the CUDA part cannot be built: {why}")
        if _flag("HTSAT_KERNELS_REQUIRE_EXT") and why.startswith(("HTSAT_KERNELS_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST")):
            sys.exit(f"htsat_kernels: {why}")
        print(f"htsat_kernels: building the C++ CPU kernels only ({why})")
        PLAN["cuda_error"] = f"the CUDA part was not built: {why}"
        return [_cpu_extension()]
    # cpp_extension reads its module-level CUDA_HOME when it builds include/library paths and runs nvcc.
    cpp_extension.CUDA_HOME = cuda_home
    built = _archs_of(gencode)
    print(f"htsat_kernels: building C++ CPU + CUDA kernels (CUDA_HOME={cuda_home}, archs {archs}: {' '.join(built)})")
    PLAN.update(cuda=True, cuda_archs=built, cuda_archs_source=archs)
    cpu = _cpu_extension()
    return [
        cpp_extension.CUDAExtension(
            EXT_NAME,
            cpu.sources + sorted(glob.glob(os.path.join(CSRC, "*.cu"))),
            depends=cpu.depends,
            include_dirs=cpu.include_dirs,
            extra_compile_args={
                "cxx": cpu.extra_compile_args["cxx"] + ["-DHTSAT_WITH_CUDA=1"],
                "nvcc": ["-O3", "-DHTSAT_WITH_CUDA=1", *gencode],
            },
            extra_link_args=cpu.extra_link_args,
        )
    ]


def _failure(exc: BaseException) -> str:
    """One line for the build record: the exception, and the compiler (its own output is in the build log)."""
    return f"{type(exc).__name__}: {exc} (CXX={os.environ.get('CXX', 'c++')!r})"


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class BuildOptionalExtension(BuildExtension):
        """build_ext that never fails the install over the extension (unless HTSAT_KERNELS_REQUIRE_EXT=1):
        a CUDA compile failure falls back to the C++ CPU kernels alone, a C++ failure to no extension."""

        def run(self) -> None:
            inplace, compiler = self.inplace, self.compiler  # distutils' run() replaces both
            info = dict(PLAN)
            try:
                super().run()
            except Exception as exc:  # compile, link or toolchain-check failure of any kind
                if _flag("HTSAT_KERNELS_REQUIRE_EXT"):
                    raise
                if info["cuda"]:
                    info.update(cuda=False, cuda_archs=None, cuda_error=f"the CUDA build failed: {_failure(exc)}")
                    _warn(f"{info['cuda_error']}\nRetrying with the C++ CPU kernels only (CUDA tensors will use the references).")
                    self.inplace, self.compiler = inplace, compiler
                    for ext in self.extensions:
                        _make_cpu_only(ext)
                    try:
                        super().run()
                    except Exception as cpu_exc:
                        info["error"] = f"the C++ build failed: {_failure(cpu_exc)}"
                else:
                    info["error"] = f"the C++ build failed: {_failure(exc)}"
                if info["error"]:
                    self.inplace = inplace
                    self._remove_stale_extension()
                    _warn(
                        f"{info['error']}\nhtsat_kernels is installed without its compiled ops: every op runs its "
                        "PyTorch reference (htsat_kernels.fused_status() says why). Install a C++ compiler "
                        "(see README 'Install') and reinstall; HTSAT_KERNELS_REQUIRE_EXT=1 makes this an error."
                    )
            self._write_build_info(info, inplace)

        def _package_dirs(self, inplace: bool) -> list[str]:
            dirs = [os.path.join(self.build_lib, "htsat_kernels")]
            if inplace:
                dirs.append(self.get_finalized_command("build_py").get_package_dir("htsat_kernels"))
            return dirs

        def _remove_stale_extension(self) -> None:
            """A failed build leaves no older _C behind to be loaded against newer Python wrappers."""
            name = os.path.basename(self.get_ext_filename(self.get_ext_fullname(EXT_NAME)))
            for folder in self._package_dirs(self.inplace):
                path = os.path.join(folder, name)
                if os.path.exists(path):
                    os.remove(path)

        def _write_build_info(self, info: dict, inplace: bool) -> None:
            for folder in self._package_dirs(inplace):
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, BUILD_INFO), "w") as f:
                    json.dump(info, f, indent=1)

    return {"build_ext": BuildOptionalExtension.with_options(use_ninja=True)}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
