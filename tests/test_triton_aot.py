"""Ahead-of-time compilation of every Triton kernel under dit_fast/kernels/triton/ for sm_80 and
sm_90 (``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``): catches kernels that
only the interpreter accepts, without a GPU.

Convention: each module in dit_fast/kernels/triton/ that defines @triton.jit kernels defines
``AOT_SPECS = [(kernel, signature, constexprs[, options]), ...]`` with representative
specializations (fp32 and bf16 at least; options: num_warps / num_stages as launched). Every kernel needs at least one spec; @triton.jit *device functions*
(helpers called from other @triton.jit functions, compiled as part of them) are exempt, as is
anything a module lists in an optional ``AOT_DEVICE_FUNCTIONS``. Constexpr parameters may be given
in ``constexprs`` only (they are added to the signature as "constexpr" here).

Compilation does not work under TRITON_INTERPRET (which conftest.py sets without a GPU), so it
runs in a subprocess with TRITON_INTERPRET removed. That subprocess is started when this module is
imported (at collection), so it compiles while the other tests run; the tests here wait for its
report (and it is killed at exit if they were deselected). Compiled kernels land in Triton's cache
(~/.triton/cache), so later runs are quicker. DIT_FAST_AOT_ARCHS (default "80,90") selects the
targets.
"""

import atexit
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "dit_fast" / "kernels" / "triton"
MODULES = sorted(p.stem for p in KERNEL_DIR.glob("*.py") if p.stem != "__init__")
ARCHS = [int(a) for a in os.environ.get("DIT_FAST_AOT_ARCHS", "80,90").split(",") if a.strip()]

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

_SCRIPT = r"""
import importlib, json, re, sys, traceback
from triton.runtime.jit import JITFunction
from dit_fast.kernels.triton._aot import compile_spec, kernel_stats

modules, archs = sys.argv[1].split(","), [int(a) for a in sys.argv[2].split(",")]
report = {}
for name in modules:
    entry = report[name] = {"kernels": [], "helpers": [], "missing_spec": [], "bad_specs": [],
                            "compiled": 0, "errors": [], "has_specs": None, "stats": []}
    try:
        mod = importlib.import_module(f"dit_fast.kernels.triton.{name}")
    except Exception:
        entry["errors"].append("import failed:\n" + traceback.format_exc())
        continue
    jitted = {k: v for k, v in vars(mod).items()
              if isinstance(v, JITFunction) and v.fn.__module__ == mod.__name__}
    exempt = {getattr(f, "__name__", str(f)) for f in getattr(mod, "AOT_DEVICE_FUNCTIONS", ())}
    for k, fn in jitted.items():
        called = any(re.search(rf"\b{re.escape(fn.__name__)}\s*\(", other.src)
                     for other in jitted.values() if other is not fn)
        (entry["helpers"] if called or fn.__name__ in exempt else entry["kernels"]).append(k)
    specs = getattr(mod, "AOT_SPECS", None)
    entry["has_specs"] = specs is not None
    specs = list(specs or [])
    ok = lambda s: isinstance(s, tuple) and len(s) in (3, 4) and isinstance(s[0], JITFunction)
    covered = {s[0].__name__ for s in specs if ok(s)}
    entry["missing_spec"] = [k for k in entry["kernels"] if jitted[k].__name__ not in covered]
    for i, spec in enumerate(specs):
        if not ok(spec):
            entry["bad_specs"].append(f"AOT_SPECS[{i}] is not (jit kernel, signature, constexprs"
                                      f"[, options])")
            continue
        fn, sig, consts = spec[:3]
        for arch in archs:
            try:
                k = compile_spec(spec, arch)
                if not k.asm.get("cubin"):
                    raise RuntimeError("no cubin produced")
                entry["compiled"] += 1
                entry["stats"].append({"kernel": fn.__name__, "arch": arch, "signature": sig,
                                       "constexprs": {c: str(v) for c, v in consts.items()},
                                       **kernel_stats(k)})
            except Exception as e:
                entry["errors"].append(f"{fn.__name__} sm_{arch} {sig} {consts}: "
                                       f"{type(e).__name__}: {e}")
print("AOT_REPORT " + json.dumps(report))
"""


def _start():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    out = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, ",".join(MODULES),
                             ",".join(map(str, ARCHS))], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, text=True)
    atexit.register(lambda: proc.poll() is None and proc.kill())
    return proc, out


_RUN = _start() if HAS_TRITON and MODULES else None  # compiles in the background from here on


@pytest.fixture(scope="session")
def aot_report():
    proc, out = _RUN
    try:
        rc = proc.wait(timeout=1200)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out.seek(0)
    text = out.read()
    lines = [ln for ln in text.splitlines() if ln.startswith("AOT_REPORT ")]
    assert rc == 0 and lines, f"AOT subprocess failed ({rc}):\n{text}"
    return json.loads(lines[-1][len("AOT_REPORT "):])


def test_there_are_kernel_modules():
    assert MODULES, f"no modules in {KERNEL_DIR}"


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90(module, aot_report):
    entry = aot_report[module]
    assert not entry["errors"], "\n".join(entry["errors"])
    if entry["kernels"]:
        assert entry["has_specs"], f"{module} defines @triton.jit kernels but no AOT_SPECS"
    assert not entry["bad_specs"], entry["bad_specs"]
    assert not entry["missing_spec"], (f"{module}: @triton.jit kernels without an AOT_SPECS entry: "
                                       f"{entry['missing_spec']}")
    assert entry["compiled"] >= len(entry["kernels"]) * len(ARCHS)


# Shared memory a block may use (opt-in maximum): sm_80 163 KB, sm_90 227 KB.
MAX_SHARED = {80: 166912, 90: 232448}


@pytest.mark.parametrize("module", MODULES)
def test_shared_memory_fits_every_arch(module, aot_report):
    for st in aot_report[module]["stats"]:
        if st["arch"] in MAX_SHARED:
            assert st["shared_bytes"] <= MAX_SHARED[st["arch"]], st


def _attention_stats(aot_report, arch):
    if arch not in ARCHS:
        pytest.skip(f"sm_{arch} not in DIT_FAST_AOT_ARCHS")
    return [st for st in aot_report["attention"]["stats"] if st["arch"] == arch]


def test_attention_fp32_uses_tensor_cores_only_in_tf32_mode(aot_report):
    """The fp32 specializations with DOT_PRECISION "tf32" compile to wgmma on sm_90 (mma.sync on
    sm_80); "ieee" ones to FMAs, with no tensor-core instruction."""
    for arch, mma in ((90, "wgmma"), (80, "mma")):
        fp32 = [st for st in _attention_stats(aot_report, arch)
                if st["signature"].get("QKV") == "*fp32"]  # the kernels with matmuls
        tf32 = [st for st in fp32 if st["constexprs"]["DOT_PRECISION"] == "tf32"]
        ieee = [st for st in fp32 if st["constexprs"]["DOT_PRECISION"] == "ieee"]
        assert tf32 and ieee
        for st in tf32:
            assert st[mma] > 0 and st["fma"] < 100, st
        for st in ieee:
            assert st["wgmma"] == 0 and st["mma"] == 0 and st["fma"] > 500, st


def test_attention_backward_prefetches_and_dit_configs_do_not_spill(aot_report):
    """Every backward matmul kernel is compiled with num_stages >= 2 (its loop's loads
    prefetched); on sm_90 the 16-bit kernels at DiT's head dims 64 / 72 use no stack (spills)."""
    for arch in ARCHS:
        for st in _attention_stats(aot_report, arch):
            if st["kernel"] in ("_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
                assert st["num_stages"] >= 2, st
    for st in _attention_stats(aot_report, 90):
        if (st["signature"].get("QKV", st["signature"].get("O")) in ("*bf16", "*fp16")
                and st["constexprs"]["HEAD_DIM"] in ("64", "72")):
            assert st["spill_bytes"] == 0, st
