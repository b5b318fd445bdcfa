"""Build script for dit_fast's native extensions (metadata lives in pyproject.toml).

Extensions (both optional: the package imports and runs on its pure-PyTorch fallbacks without them):

  dit_fast._C       C++ CPU kernels + the `torch.ops.dit_fast` op library (csrc/binding.cpp,
                    csrc/cpu/*.cpp). Built whenever torch is importable at build time and a C++
                    compiler works; OpenMP (-fopenmp) when the compiler supports it.
  dit_fast._C_cuda  CUDA kernels (csrc/cuda/*.cu + csrc/cuda/binding_cuda.cpp). Built when torch is a
                    CUDA build and a CUDA toolkit with a matching major version is found:
                    CUDA_HOME / CUDA_PATH if set, else the toolkit the `nvcc` on PATH belongs to
                    (asked from nvcc itself, so wrapper scripts and symlinks resolve), else
                    /usr/local/cuda; it must hold bin/nvcc and include/cuda_runtime.h.

torch is not a build requirement (pyproject.toml), so build against the torch you run with:

    pip install -e . --no-build-isolation

pip hides a successful build's output (without -v), so the build summary (which extension was built
or skipped, and why) is also written to the terminal (/dev/tty) when there is one, and to
dit_fast/_build.json next to the extensions (`python -m dit_fast.selftest` prints it).

Environment switches:
  DIT_FAST_SKIP_CPU_BUILD=1    build no extension at all (pure Python install)
  DIT_FAST_FORCE_CPU_BUILD=1   fail the install if dit_fast._C cannot be built
  DIT_FAST_SKIP_CUDA_BUILD=1   do not build dit_fast._C_cuda
  DIT_FAST_FORCE_CUDA_BUILD=1  fail the install if dit_fast._C_cuda cannot be built
  TORCH_CUDA_ARCH_LIST         CUDA targets in torch's syntax, e.g. "9.0a" or "10.0;12.0+PTX". Default
                               (unset): DEFAULT_CUDA_GENCODE below, machine code for sm_80 (A100; also
                               runs on sm_86/sm_89) and sm_90a (H100/H200) plus compute_90 PTX, which
                               the driver compiles on first load for any newer GPU (Blackwell ...)
  MAX_JOBS                     parallel compile jobs (honoured by torch's ninja build)
Without a FORCE switch a failed extension build prints a loud warning and the install goes on.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from glob import glob

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
# Used when TORCH_CUDA_ARCH_LIST is unset (torch's syntax cannot ask for PTX without the matching
# machine code, and sm_90 code next to sm_90a would only add compile time).
DEFAULT_CUDA_GENCODE = (
    "-gencode=arch=compute_80,code=sm_80",     # A100, and A10/L4/RTX 30-40 (same major: compatible)
    "-gencode=arch=compute_90a,code=sm_90a",   # H100 / H200 (sm_90a runs on sm_90 only)
    "-gencode=arch=compute_90,code=compute_90",  # PTX: JIT-compiled by the driver on newer GPUs
)


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


SKIP_CPU = _flag("DIT_FAST_SKIP_CPU_BUILD")
FORCE_CPU = _flag("DIT_FAST_FORCE_CPU_BUILD")
SKIP_CUDA = _flag("DIT_FAST_SKIP_CUDA_BUILD") or SKIP_CPU
FORCE_CUDA = _flag("DIT_FAST_FORCE_CUDA_BUILD")

# name -> (status, detail); status in {"built", "skipped", "FAILED"}
SUMMARY = {}


def _log(msg):
    print(f"[dit_fast setup] {msg}", file=sys.stderr, flush=True)


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cxx_has_openmp(flag="-fopenmp"):
    """True if the C++ compiler compiles *and* links a tiny OpenMP program with `flag`."""
    cxx = os.environ.get("CXX", "c++")
    src = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.cpp")
        with open(path, "w") as f:
            f.write(src)
        try:
            r = subprocess.run([cxx, flag, path, "-o", os.path.join(tmp, "probe")],
                               capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


def nvcc_toolkit(nvcc):
    """The CUDA toolkit root that `nvcc` really runs from. nvcc may be a wrapper script or a symlink
    (e.g. /usr/local/bin/nvcc doing `exec /usr/local/cuda-13.0/bin/nvcc`), so the parent of its
    path can be wrong: symlinks are resolved, then nvcc's dry run names the directory it runs from
    (_HERE_; a script's exec target). None if nvcc does not run."""
    nvcc = os.path.realpath(nvcc)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            r = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                               capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    m = re.search(r"^#\$ _HERE_=(.+)$", r.stdout + r.stderr, re.M)
    bindir = m.group(1).strip() if m else os.path.dirname(nvcc)
    return os.path.dirname(os.path.realpath(bindir))


def find_cuda_home(environ=os.environ, which=shutil.which):
    """(toolkit root or None, how it was found). CUDA_HOME / CUDA_PATH if set, else the toolkit of
    the nvcc on PATH, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            return environ[var], var
    nvcc = which("nvcc")
    if nvcc:
        home = nvcc_toolkit(nvcc)
        if home:
            return home, f"the toolkit of {nvcc}"
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda", "the default /usr/local/cuda"
    return None, "no CUDA_HOME / CUDA_PATH, no nvcc on PATH, no /usr/local/cuda"


def cuda_toolkit_problem(home):
    """None if `home` holds what the build needs, else what is missing."""
    for rel in (("bin", "nvcc"), ("include", "cuda_runtime.h")):
        if not os.path.exists(os.path.join(home, *rel)):
            return f"{os.path.join(home, *rel)} not found"
    return None


def cuda_arch_flags(environ=os.environ):
    """nvcc target flags: none when TORCH_CUDA_ARCH_LIST is set (torch turns it into flags), else
    DEFAULT_CUDA_GENCODE."""
    return [] if environ.get("TORCH_CUDA_ARCH_LIST", "").strip() else list(DEFAULT_CUDA_GENCODE)


def _nvcc_version(cuda_home):
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _cuda_skip_reason(torch, cuda_home, found_by):
    """None if dit_fast._C_cuda can be attempted, else why not."""
    if SKIP_CUDA:
        return ("DIT_FAST_SKIP_CPU_BUILD=1 (no extensions)" if SKIP_CPU
                else "DIT_FAST_SKIP_CUDA_BUILD=1")
    if getattr(torch.version, "hip", None):
        return f"torch {torch.__version__} is a ROCm build (not supported)"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is not a CUDA build"
    if cuda_home is None:
        return f"no CUDA toolkit found ({found_by}); set CUDA_HOME"
    problem = cuda_toolkit_problem(cuda_home)
    if problem:
        return f"CUDA toolkit {cuda_home} (from {found_by}) is incomplete: {problem}; set CUDA_HOME"
    nv = _nvcc_version(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if nv is not None and nv[0] != torch_major:
        return (f"nvcc {nv[0]}.{nv[1]} ({cuda_home}) does not match torch's CUDA "
                f"{torch.version.cuda} (major versions must agree)")
    return None


def _extensions():
    """Returns (ext_modules, cmdclass)."""
    if SKIP_CPU:
        SUMMARY["dit_fast._C"] = ("skipped", "DIT_FAST_SKIP_CPU_BUILD=1")
        SUMMARY["dit_fast._C_cuda"] = ("skipped", "DIT_FAST_SKIP_CPU_BUILD=1")
        return [], {}
    cuda_home, found_by = find_cuda_home()
    if cuda_home and not cuda_toolkit_problem(cuda_home):
        # torch reads CUDA_HOME when torch.utils.cpp_extension is imported; its own guess (the
        # parent of the first nvcc on PATH) is wrong for wrapper scripts.
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        import torch.utils.cpp_extension as cpp_extension
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        reason = (f"torch is not importable at build time ({e}); "
                  "install torch first and use `pip install --no-build-isolation`")
        if FORCE_CPU or FORCE_CUDA:
            raise RuntimeError(f"dit_fast: cannot build the forced extension(s): {reason}")
        SUMMARY["dit_fast._C"] = ("skipped", reason)
        SUMMARY["dit_fast._C_cuda"] = ("skipped", reason)
        return [], {}

    include_dirs = [os.path.join(ROOT, CSRC)]
    cxx_flags = ["-O3"]
    link_flags = []
    if sys.platform == "win32":
        cxx_flags = ["/O2", "/openmp"]
        omp = True
    else:
        omp = _cxx_has_openmp()
        if omp:
            cxx_flags.append("-fopenmp")
            link_flags.append("-fopenmp")
        else:
            cxx_flags += ["-Wno-unknown-pragmas"]
    # C++ standard: our own sources are C++17 (CMake and the nvcc tests build them as such); the
    # torch binding is compiled with whatever standard torch's headers require, which
    # BuildExtension adds (C++17 for older torch, C++20 for torch >= 2.10), so no -std here.

    # csrc/binding.cpp defines the op library; csrc/binding_*.cpp add fragments to it.
    cpu_sources = _rel(glob(os.path.join(ROOT, CSRC, "binding*.cpp"))
                       + glob(os.path.join(ROOT, CSRC, "cpu", "*.cpp")))
    depends = _rel(glob(os.path.join(ROOT, CSRC, "**", "*.h"), recursive=True)
                   + glob(os.path.join(ROOT, CSRC, "**", "*.cuh"), recursive=True))
    exts = [CppExtension(
        name="dit_fast._C",
        sources=cpu_sources,
        include_dirs=include_dirs,
        depends=depends,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
        optional=not FORCE_CPU,
    )]
    SUMMARY["dit_fast._C"] = ("pending", f"openmp={'yes' if omp else 'no'}")

    reason = _cuda_skip_reason(torch, cuda_home, found_by)
    if reason is None:
        cpp_extension.CUDA_HOME = cuda_home  # in case torch.utils.cpp_extension was imported earlier
    if reason is not None:
        if FORCE_CUDA:
            raise RuntimeError(f"DIT_FAST_FORCE_CUDA_BUILD=1 but dit_fast._C_cuda cannot be built: "
                               f"{reason}")
        SUMMARY["dit_fast._C_cuda"] = ("skipped", reason)
    else:
        arch_flags = cuda_arch_flags()
        cuda_sources = _rel(glob(os.path.join(ROOT, CSRC, "cuda", "binding*.cpp"))
                            + glob(os.path.join(ROOT, CSRC, "cuda", "*.cu")))
        exts.append(CUDAExtension(
            name="dit_fast._C_cuda",
            sources=cuda_sources,
            include_dirs=include_dirs,
            depends=depends,
            extra_compile_args={
                "cxx": ["-O3"],
                # Our .cu files are torch-free C++17.
                "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr",
                         *arch_flags],
            },
            optional=not FORCE_CUDA,
        ))
        targets = (f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}" if not arch_flags
                   else "targets sm_80, sm_90a + compute_90 PTX")
        SUMMARY["dit_fast._C_cuda"] = ("pending", f"{targets}; CUDA {cuda_home} (from {found_by})")

    class BuildExt(BuildExtension):
        """torch's BuildExtension, but a failing extension is reported instead of fatal (unless
        forced), the CUDA extension is skipped when the CPU one failed, and a summary is printed."""

        def _forced(self, ext):
            return FORCE_CUDA if ext.name.endswith("_C_cuda") else FORCE_CPU

        def build_extension(self, ext):
            if ext.name.endswith("_C_cuda") and SUMMARY.get("dit_fast._C", ("",))[0] == "FAILED":
                SUMMARY[ext.name] = ("skipped", "dit_fast._C failed (it defines the op schemas)")
                if self._forced(ext):
                    self._fatal = True
                    raise RuntimeError("DIT_FAST_FORCE_CUDA_BUILD=1 but dit_fast._C failed")
                self._failed.append(ext)
                return
            t0 = time.time()
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - compiler / ninja / linker errors
                if self._forced(ext):
                    self._fatal = True
                    SUMMARY[ext.name] = ("FAILED", f"{type(e).__name__}: {e} (forced: fatal)")
                    raise
                self._fail(ext, e)
                return
            prev = SUMMARY.get(ext.name, ("", ""))[1]
            SUMMARY[ext.name] = ("built", f"{time.time() - t0:.1f}s; {prev}")

        def _fail(self, ext, err):
            SUMMARY[ext.name] = ("FAILED", f"{type(err).__name__}: {err}")
            self._failed.append(ext)
            _log("!" * 78)
            _log(f"WARNING: building {ext.name} failed; dit_fast will fall back to its "
                 f"pure-PyTorch implementations for it. Error: {err}")
            _log("!" * 78)

        def build_extensions(self):
            self._failed, self._fatal = [], False
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001 - torch's global checks (compiler, CUDA version)
                if self._fatal:
                    raise
                err = e
                cuda = [x for x in self.extensions if x.name.endswith("_C_cuda")]
                if cuda and not FORCE_CUDA:  # maybe only the CUDA toolchain checks failed
                    _log(f"WARNING: build setup failed ({e}); retrying without dit_fast._C_cuda")
                    for x in cuda:
                        self._fail(x, e)
                    self.extensions = [x for x in self.extensions if x not in cuda]
                    try:
                        super().build_extensions()
                        err = None
                    except Exception as e2:  # noqa: BLE001
                        if self._fatal:
                            raise
                        err = e2
                if err is not None:
                    if FORCE_CPU or FORCE_CUDA:
                        raise
                    for x in self.extensions:
                        if x not in self._failed:
                            self._fail(x, err)
            # Drop failed extensions so later steps (in-place copy for editable installs, wheel
            # contents) do not look for their outputs.
            self.extensions = [x for x in self.extensions if x not in self._failed]

        def run(self):
            try:
                super().run()
            finally:
                _print_summary(os.path.dirname(self.get_ext_fullpath("dit_fast._C")))

    return exts, {"build_ext": BuildExt}


def summary_lines():
    lines = []
    for name in ("dit_fast._C", "dit_fast._C_cuda"):
        status, detail = SUMMARY.get(name, ("skipped", "not configured"))
        lines.append(f"{name:16s} {status.upper():8s} {detail}")
    return lines


def _print_summary(package_dir=None):
    """The summary on stderr (shown by `python setup.py` and `pip -v`), on the terminal (pip hides a
    successful build's output) and in <package_dir>/_build.json."""
    lines = summary_lines()
    _log("=" * 78)
    _log("dit_fast native extension build summary")
    for line in lines:
        _log(f"  {line}")
    _log("  (anything not built falls back to pure PyTorch; see dit_fast.backends())")
    _log("=" * 78)
    if not sys.stderr.isatty():  # under pip: stderr is captured
        try:
            with open("/dev/tty", "w") as tty:
                tty.write("\n" + "".join(f"[dit_fast setup] {line}\n" for line in lines))
        except OSError:  # no controlling terminal (CI, IDE): the file and pip -v still have it
            pass
    if package_dir:
        try:
            os.makedirs(package_dir, exist_ok=True)
            with open(os.path.join(package_dir, "_build.json"), "w") as f:
                json.dump({name: {"status": status, "detail": detail}
                           for name, (status, detail) in SUMMARY.items()}, f, indent=1)
        except OSError as e:
            _log(f"could not write {package_dir}/_build.json: {e}")


def main():
    ext_modules, cmdclass = _extensions()
    building = any(a.startswith(("build", "bdist", "editable", "develop", "install"))
                   for a in sys.argv[1:])
    if not ext_modules and building:  # (not for pip's metadata step: egg_info / dist_info)
        _print_summary(os.path.join(ROOT, "dit_fast"))
    setup(ext_modules=ext_modules, cmdclass=cmdclass)


if __name__ == "__main__":  # also under pip: setuptools' build backend runs this file as __main__
    main()
