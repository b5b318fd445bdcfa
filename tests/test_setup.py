"""setup.py's build configuration: which CUDA toolkit it builds with (CUDA_HOME / CUDA_PATH, else the
toolkit the nvcc on PATH really belongs to, through wrapper scripts and symlinks), the default
fatbin targets (machine code for sm_80 / sm_90a plus compute_90 PTX that newer GPUs JIT-compile), and
the build summary that a plain `pip install` shows on the terminal. setup.py is loaded as a module:
it only builds when run as __main__. nvcc-dependent tests skip without nvcc.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_setup():
    spec = importlib.util.spec_from_file_location("dit_fast_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


S = _load_setup()


def _real_nvcc():
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    return nvcc if os.path.exists(nvcc) else None


NVCC = _real_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _toolkit_of(nvcc):
    """The toolkit root of the real nvcc binary (resolved independently of setup.py: the exec line
    of a wrapper script, then symlinks)."""
    path = nvcc
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"#!"):
        for word in head.decode(errors="replace").split():
            if word.endswith("/nvcc") and os.path.exists(word):
                path = word
    return os.path.realpath(os.path.dirname(os.path.dirname(os.path.realpath(path))))


@pytest.mark.parametrize("var", ["CUDA_HOME", "CUDA_PATH"])
def test_cuda_home_from_environment_wins(var):
    assert S.find_cuda_home({var: "/opt/my-cuda"}, which=lambda _: "/usr/bin/nvcc") == ("/opt/my-cuda", var)


def test_cuda_home_prefers_cuda_home_over_cuda_path():
    assert S.find_cuda_home({"CUDA_HOME": "/a", "CUDA_PATH": "/b"})[0] == "/a"


@needs_nvcc
@pytest.mark.parametrize("kind", ["wrapper script", "symlink"])
def test_nvcc_on_path_resolves_to_its_real_toolkit(tmp_path, kind):
    real = _toolkit_of(NVCC)
    fake = tmp_path / "bin" / "nvcc"
    fake.parent.mkdir()
    if kind == "symlink":
        fake.symlink_to(os.path.join(real, "bin", "nvcc"))
    else:
        fake.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
        fake.chmod(0o755)
    home, how = S.find_cuda_home({}, which=lambda _: str(fake))
    # torch's own guess would be the parent of tmp_path/bin, which holds no CUDA headers
    assert os.path.realpath(home) == real and str(fake) in how
    assert S.cuda_toolkit_problem(home) is None


def test_incomplete_toolkit_names_the_missing_file(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    problem = S.cuda_toolkit_problem(str(tmp_path))
    assert problem == f"{tmp_path}/include/cuda_runtime.h not found"
    assert "bin/nvcc not found" in S.cuda_toolkit_problem(str(tmp_path / "nowhere"))


def test_default_targets_have_ptx_for_newer_gpus():
    flags = S.cuda_arch_flags({})
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
                     "-gencode=arch=compute_90,code=compute_90"]
    # TORCH_CUDA_ARCH_LIST replaces the default (torch turns it into flags)
    assert S.cuda_arch_flags({"TORCH_CUDA_ARCH_LIST": "10.0;12.0+PTX"}) == []


def _cuobjdump():
    """The toolkit's cuobjdump, else one on PATH, else the copy Triton ships."""
    candidates = [os.path.join(_toolkit_of(NVCC), "bin", "cuobjdump") if NVCC else None,
                  shutil.which("cuobjdump")]
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.path.exists(c)), None)


@needs_nvcc
@pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump not found")
@pytest.mark.slow
def test_default_targets_compile_to_sm80_sm90a_code_and_compute90_ptx(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text("__global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }\n")
    obj = tmp_path / "k.o"
    subprocess.run([NVCC, *S.cuda_arch_flags({}), "-c", str(src), "-o", str(obj)], check=True,
                   capture_output=True, timeout=300)
    cuobjdump = _cuobjdump()
    elf = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", str(obj)], capture_output=True, text=True, check=True).stdout
    assert "sm_80" in elf and "sm_90a" in elf and "sm_90." not in elf, elf
    assert "sm_90" in ptx and "sm_80" not in ptx, ptx  # cuobjdump names PTX by its target


@pytest.mark.skipif(shutil.which("script") is None, reason="needs `script` (util-linux) for a terminal")
def test_build_summary_reaches_the_terminal_when_pip_captures_output(tmp_path):
    """pip captures a successful build's stdout/stderr; the summary must still reach the terminal.
    Runs setup.py (its own copy, no extensions) with stdout and stderr discarded under a pseudo
    terminal: what the terminal shows came through /dev/tty."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "dit_fast").mkdir()
    (tmp_path / "dit_fast" / "__init__.py").write_text("")
    log = tmp_path / "tty.log"
    env = dict(os.environ, DIT_FAST_SKIP_CPU_BUILD="1")
    cmd = f"{sys.executable} setup.py build_ext >/dev/null 2>&1"
    subprocess.run(["script", "-qec", cmd, str(log)], cwd=tmp_path, env=env, check=True, timeout=300,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    shown = log.read_text(errors="replace")
    assert "[dit_fast setup] dit_fast._C      SKIPPED  DIT_FAST_SKIP_CPU_BUILD=1" in shown, shown
    assert "[dit_fast setup] dit_fast._C_cuda SKIPPED" in shown
    record = (tmp_path / "dit_fast" / "_build.json").read_text()
    assert '"status": "skipped"' in record


def test_metadata_step_prints_no_summary(tmp_path):
    """pip's metadata step (egg_info) runs setup.py too; only a build prints the summary."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    env = dict(os.environ, DIT_FAST_SKIP_CPU_BUILD="1")
    r = subprocess.run([sys.executable, "setup.py", "egg_info"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "build summary" not in r.stderr
