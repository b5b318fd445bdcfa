"""Configures and builds the torch-free CMake project (CMakeLists.txt) in a temporary directory
and runs its C++ unit tests (csrc/tests) with ctest.

Every csrc/tests/test_*.cpp is a test (CMake globs them too) and must appear in ctest's report.
The CUDA part of the CMake project is left out here to keep the build short (the .cu files are
compiled by tests/test_cuda_compile.py); set DIT_FAST_TEST_CMAKE_CUDA=1 to include it (its
kernel tests, csrc/tests/test_*.cu, then run on a GPU, or report themselves skipped).
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")
CTEST = shutil.which("ctest")
CPP_TESTS = sorted(p.stem for p in (ROOT / "csrc" / "tests").glob("test_*.cpp"))
CUDA_TESTS = sorted(p.stem for p in (ROOT / "csrc" / "tests").glob("test_*.cu"))

pytestmark = pytest.mark.skipif(CMAKE is None or CTEST is None, reason="cmake/ctest not found")


def _run(cmd, cwd, timeout):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.mark.slow
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    cuda = "ON" if os.environ.get("DIT_FAST_TEST_CMAKE_CUDA") == "1" else "OFF"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run([CMAKE, "-S", str(ROOT), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
          f"-DDIT_FAST_ENABLE_CUDA={cuda}"], ROOT, 300)
    jobs = os.environ.get("MAX_JOBS", "2")
    _run([CMAKE, "--build", str(build), "--parallel", jobs], ROOT, 900)
    out = _run([CTEST, "--output-on-failure", "--test-dir", str(build)], build, 600)
    assert "100% tests passed" in out, out
    for name in CPP_TESTS + (CUDA_TESTS if cuda == "ON" else []):
        assert re.search(rf"\b{name} \.+", out), f"{name} did not run:\n{out}"


def test_cpp_tests_found():
    assert CPP_TESTS, "no csrc/tests/test_*.cpp"
