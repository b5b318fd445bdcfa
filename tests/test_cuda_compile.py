"""Compiles each csrc/cuda/*.cu file on its own with nvcc (sm_80 and sm_90a), as documented at
the top of the file, and again with the macros torch's CUDAExtension adds (which forbid implicit
half/bfloat16 operators and conversions). Also syntax-checks the CUDA torch binding against the
installed torch headers. Skipped without nvcc. Nothing is run: no GPU is needed.
"""

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))


def _find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME / PATH)")

ARCH = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
TORCH_MACROS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def _nvcc_include_dirs(tmp_path):
    """The CUDA include directories nvcc itself uses (nvcc may be a wrapper script)."""
    src = tmp_path / "empty.cu"
    src.write_text("")
    out = subprocess.run([NVCC, "--dryrun", "-c", str(src), "-o", str(tmp_path / "e.o")],
                         capture_output=True, text=True, timeout=120)
    dirs = []
    for line in (out.stdout + out.stderr).splitlines():
        if "INCLUDES=" in line:
            dirs += re.findall(r'(?:-I|"-isystem" )"?([^"\s]+)', line)
    return dirs


def _run(cmd, timeout=600):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def test_there_are_cuda_sources():
    assert CU_FILES, "no csrc/cuda/*.cu files"


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("macros", [False, True], ids=["plain", "torch-macros"])
@pytest.mark.slow
def test_cu_compiles_alone(cu, macros, tmp_path):
    cmd = [NVCC, "-std=c++17", "-I", str(CSRC), *ARCH, "-c", str(cu), "-o", str(tmp_path / "k.o")]
    if macros:
        cmd[1:1] = [*TORCH_MACROS, "-Xcompiler", "-Wall", "--Werror", "all-warnings"]
    _run(cmd)
    assert (tmp_path / "k.o").stat().st_size > 0


@pytest.mark.parametrize("binding", sorted((CSRC / "cuda").glob("binding*.cpp")), ids=lambda p: p.name)
@pytest.mark.slow
def test_cuda_binding_syntax(binding, tmp_path):
    """g++ -fsyntax-only on each csrc/cuda/binding*.cpp with torch + CUDA headers (a CPU-only torch
    wheel lacks one generated CUDA header; a stub stands in for it)."""
    torch = pytest.importorskip("torch")
    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx})")
    cuda_incs = _nvcc_include_dirs(tmp_path)
    assert cuda_incs, "could not find nvcc's include directories"
    incs = [*include_paths(), *cuda_incs, str(CSRC), sysconfig.get_paths()["include"]]
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths()):
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        incs.append(str(tmp_path / "stub"))
    std = "-std=c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10) \
        else "-std=c++17"
    _run([cxx, std, "-fsyntax-only", *[f"-I{p}" for p in incs],
          str(binding)])
