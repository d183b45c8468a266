"""The compiled extension never blocks the install (issue #16 item 2).

A broken C++ compiler (CXX=false) or a broken nvcc still builds the package, with a warning, and the
package then imports and runs every op through its PyTorch reference, with fused_status() saying why;
HTSAT_KERNELS_REQUIRE_EXT=1 (set in CI) turns the same failure into a failed build. Each build runs
`setup.py build` into a temporary folder in a subprocess: with CXX=false it fails at once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build(tmp_path, **env_overrides) -> tuple[subprocess.CompletedProcess, str]:
    """`setup.py build` of this tree into tmp_path; (the finished process, the built library folder)."""
    lib = str(tmp_path / "lib")
    env = dict(os.environ)
    for name in (
        "HTSAT_KERNELS_REQUIRE_EXT",
        "HTSAT_KERNELS_REQUIRE_CUDA",
        "HTSAT_KERNELS_SKIP_CUDA",
        "HTSAT_KERNELS_CUDA_ARCHS",
        "TORCH_CUDA_ARCH_LIST",
    ):
        env.pop(name, None)
    env.update(env_overrides)
    proc = subprocess.run(
        [sys.executable, "setup.py", "build", "--build-base", str(tmp_path / "build"), "--build-lib", lib],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, lib


def _record(lib: str) -> dict:
    with open(os.path.join(lib, "htsat_kernels", "_C_build.json")) as f:
        return json.load(f)


def _import_built_package(lib: str) -> dict:
    """Imports htsat_kernels from `lib` in a fresh interpreter and runs patch_merge under "auto" and
    "fused". An editable install of this repository maps htsat_kernels._C to the source tree through its
    meta-path finder; it is removed so that only `lib` is seen."""
    code = textwrap.dedent(
        """
        import json, sys
        sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
        import torch
        import htsat_kernels
        from htsat_kernels import BackendUnavailable, reference
        x, w, b = torch.randn(2, 8, 8, 4), torch.randn(16), torch.randn(16)
        auto_ok = torch.allclose(htsat_kernels.patch_merge(x, w, b), reference.patch_merge(x, w, b), atol=1e-5)
        try:
            htsat_kernels.patch_merge(x, w, b, backend="fused")
            fused = None
        except BackendUnavailable as exc:
            fused = str(exc)
        print(json.dumps({"file": htsat_kernels.__file__, "status": htsat_kernels.fused_status(),
                          "auto_ok": auto_ok, "fused": fused}))
        """
    )
    env = dict(os.environ, PYTHONPATH=lib)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=lib)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _no_extension_built(lib: str) -> bool:
    names = os.listdir(os.path.join(lib, "htsat_kernels"))
    return not any(name.startswith("_C") and name.endswith((".so", ".pyd")) for name in names)


def test_broken_compiler_still_builds_and_the_package_runs_the_references(tmp_path):
    proc, lib = _build(tmp_path, CXX="false", HTSAT_KERNELS_SKIP_CUDA="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "htsat_kernels: WARNING: the C++ build failed" in proc.stderr
    assert "every op runs its PyTorch reference" in proc.stderr
    assert _no_extension_built(lib)
    record = _record(lib)
    assert record["error"].startswith("the C++ build failed") and "CXX='false'" in record["error"]

    out = _import_built_package(lib)
    assert out["file"].startswith(lib)
    assert out["auto_ok"]
    for op in ("patch_merge", "window_partition", "window_merge", "layer_norm_window_partition", "window_merge_add"):
        assert "htsat_kernels._C is not installed: the C++ build failed" in out["status"][op], out["status"][op]
    assert "the C++ build failed" in out["fused"]


def _broken_cuda_toolkit(tmp_path) -> str:
    """A CUDA_HOME whose nvcc fails every call."""
    cuda = tmp_path / "cuda"
    (cuda / "bin").mkdir(parents=True)
    (cuda / "include").mkdir()
    (cuda / "include" / "cuda_runtime.h").write_text("")
    nvcc = cuda / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: broken on purpose' >&2\nexit 1\n")
    nvcc.chmod(0o755)
    return str(cuda)


def test_broken_nvcc_falls_back_to_the_cpu_build_and_records_why(tmp_path):
    """The CUDA build fails, the C++-only retry runs (and reaches the compiler: CXX=false keeps this test
    fast), and the record keeps both reasons."""
    proc, lib = _build(tmp_path, CXX="false", CUDA_HOME=_broken_cuda_toolkit(tmp_path), HTSAT_KERNELS_CUDA_ARCHS="9.0")
    if "building the C++ CPU kernels only" in proc.stdout:
        pytest.skip("this torch has no CUDA: the CUDA part is never attempted")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "htsat_kernels: WARNING: the CUDA build failed" in proc.stderr
    assert "Retrying with the C++ CPU kernels only" in proc.stderr
    record = _record(lib)
    assert record["cuda"] is False and record["cuda_error"].startswith("the CUDA build failed")
    assert record["error"].startswith("the C++ build failed") and "'false'" in record["error"], record["error"]
    assert _no_extension_built(lib)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")
def test_broken_nvcc_with_a_working_compiler_installs_the_cpu_kernels(tmp_path):
    """The real fallback: the C++ CPU kernels compile (about 30 s of CPU) and the fused ops run on CPU."""
    proc, lib = _build(tmp_path, CUDA_HOME=_broken_cuda_toolkit(tmp_path), HTSAT_KERNELS_CUDA_ARCHS="9.0", MAX_JOBS="2")
    if "building the C++ CPU kernels only" in proc.stdout:
        pytest.skip("this torch has no CUDA: the CUDA part is never attempted")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "htsat_kernels: WARNING: the CUDA build failed" in proc.stderr
    record = _record(lib)
    assert record["cuda"] is False and record["cuda_error"].startswith("the CUDA build failed")
    assert record["error"] is None
    assert not _no_extension_built(lib)
    out = _import_built_package(lib)
    assert out["status"]["patch_merge"] == "available" and out["status"]["window_merge"] == "available"
    assert out["fused"] is None and out["auto_ok"]


def test_require_ext_turns_a_compile_failure_into_a_failed_build(tmp_path):
    proc, lib = _build(tmp_path, CXX="false", HTSAT_KERNELS_SKIP_CUDA="1", HTSAT_KERNELS_REQUIRE_EXT="1")
    assert proc.returncode != 0
    assert "WARNING" not in proc.stderr
    assert not os.path.exists(os.path.join(lib, "htsat_kernels", "_C_build.json"))


def test_bad_arch_list_is_a_clear_error_under_require_ext(tmp_path):
    proc, _ = _build(tmp_path, CXX="false", HTSAT_KERNELS_CUDA_ARCHS="sm90", HTSAT_KERNELS_REQUIRE_EXT="1")
    if "building C++ CPU + CUDA kernels" not in proc.stdout and "HTSAT_KERNELS_CUDA_ARCHS" not in proc.stderr:
        pytest.skip("no CUDA toolkit here: the arch list is never read")
    assert proc.returncode != 0
    assert "HTSAT_KERNELS_CUDA_ARCHS: cannot parse 'sm90'" in proc.stderr


@pytest.mark.parametrize(
    "env, expected, binary",
    [
        ({"TORCH_CUDA_ARCH_LIST": "8.6"}, "8.6 (TORCH_CUDA_ARCH_LIST)", "sm_86"),
        ({"TORCH_CUDA_ARCH_LIST": "8.6;Hopper"}, "8.6;Hopper (TORCH_CUDA_ARCH_LIST)", "sm_86 compute_90 sm_90"),
        ({"TORCH_CUDA_ARCH_LIST": "8.6", "HTSAT_KERNELS_CUDA_ARCHS": "9.0"}, "9.0 (HTSAT_KERNELS_CUDA_ARCHS)", "sm_90"),
        ({"HTSAT_KERNELS_CUDA_ARCHS": "8.0;9.0+PTX"}, "8.0;9.0+PTX (HTSAT_KERNELS_CUDA_ARCHS)", "sm_80 sm_90 compute_90"),
        ({}, None, None),  # the GPUs visible now, else the documented default (the newest also as PTX)
    ],
    ids=["torch-list", "torch-named", "own-override", "own-ptx", "default"],
)
def test_cuda_architectures_follow_the_documented_precedence(tmp_path, env, expected, binary):
    """The build says (and records, when the CUDA part builds: build_info below) which machine code and PTX
    the binary holds; the ops compare that list with the device at run time."""
    import torch

    proc, lib = _build(tmp_path, CXX="false", CUDA_HOME=_broken_cuda_toolkit(tmp_path), **env)
    if "building the C++ CPU kernels only" in proc.stdout:
        pytest.skip("this torch has no CUDA: the CUDA part is never attempted")
    assert proc.returncode == 0, proc.stderr[-3000:]
    if expected is None:
        if torch.cuda.device_count():
            expected = "(the GPUs visible at build time)"
        else:
            expected, binary = "8.0;9.0+PTX (default: no GPU visible", "sm_80 sm_90 compute_90"
    record = _record(lib)
    assert expected in record["cuda_archs_source"]
    assert record["cuda_archs"] is None  # the CUDA part failed (broken nvcc): nothing to compare with a device
    assert f"archs {expected}" in proc.stdout
    if binary is not None:
        assert f"{binary})" in proc.stdout
