"""`python -m dit_fast.selftest` through the command line (subprocess): it passes on a clean install,
writes its JSON, catches a deliberately broken kernel (exit 1, naming the failed checks), and rejects
bad arguments with exit status 2. CPU only here (the CUDA checks need a GPU: bench/gpu_check.sh)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args, code=None, timeout=900, **env):
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "dit_fast.selftest", *args]
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=e)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest") / "selftest.json"
    r = run(["--device", "cpu", "--json", str(out)])
    return r, out


@pytest.mark.slow
def test_selftest_passes_on_cpu(clean_run):
    r, _ = clean_run
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1].startswith("OK: ")
    for what in ("model fwd hd64", "model fwd hd72", "train grads hd64", "train grads hd72",
                 "sample eager hd64", "sample eager hd72"):
        for dtype in (("float32", "bfloat16") if "sample" not in what else ("float32",)):
            assert any(ln.startswith(f"PASS {what}") and f" {dtype} " in ln for ln in lines), (what, dtype)
    # compiled sampling either ran or says why it was skipped
    assert any("sample compile hd72" in ln and ln.startswith(("PASS", "SKIP")) for ln in lines)


@pytest.mark.slow
def test_selftest_json_holds_every_check(clean_run):
    r, out = clean_run
    checks = json.loads(out.read_text())
    printed = [ln for ln in r.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert len(checks) == len(printed) > 0
    for c in checks:
        assert {"what", "backend", "dtype", "shape", "max_err", "bound", "seconds"} <= set(c)
        assert c["max_err"] <= c["bound"], c
    # the op level ran before the model level
    model_at = next(i for i, c in enumerate(checks) if c["what"].startswith("model fwd"))
    assert model_at > 0 and all(c["backend"] != "auto" for c in checks[:model_at])


BROKEN_GELU = textwrap.dedent("""
    import sys, torch
    import dit_fast._C  # the CPU kernels the override replaces
    from dit_fast.ops.gelu import gelu_bias_ref
    lib = torch.library.Library("dit_fast", "IMPL")
    def wrong(h, bias):  # gelu(h + bias) with the wrong constant
        return gelu_bias_ref(h, bias) * 1.01
    def wrong_(h, bias):
        h.copy_(wrong(h, bias))
    lib.impl("gelu_bias_fwd", wrong, "CPU")
    lib.impl("gelu_bias_fwd_", wrong_, "CPU")
    from dit_fast import selftest
    sys.exit(selftest.main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_selftest_catches_a_broken_kernel():
    """The C++ CPU gelu_bias kernels replaced by one 1% off (first-use validation off, so the
    broken kernel serves the fused model): the fp32 forwards and training gradients fail and are
    named. (CPU fp32 inference runs fc1's GELU in the packed GEMM's epilogue, so sampling does not
    meet this kernel.)"""
    pytest.importorskip("dit_fast._C")
    r = run(["--device", "cpu", "--ops", "gelu_bias"], code=BROKEN_GELU, DIT_FAST_VALIDATE="0")
    assert r.returncode == 1, r.stdout + r.stderr
    summary = r.stdout[r.stdout.index("FAILED: "):]
    for what in ("model fwd hd64 [auto float32]", "model fwd hd72 [auto float32]",
                 "train grads hd64 [auto float32]", "train grads hd72 [auto float32]"):
        assert what in summary, summary


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--json", "/nonexistent-dir/x.json"], "--json /nonexistent-dir/x.json: directory /nonexistent-dir does not exist"),
    (["--ops", "ln_modulate,nope"], "--ops: unknown op(s) nope"),
    (["--interpreter", "--device", "cuda"], "error: "),
])
@pytest.mark.slow
def test_bad_arguments_exit_2(args, message):
    r = run(args, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr
    assert "PASS" not in r.stdout


@pytest.mark.slow
def test_dit_fast_selftest_command():
    r = subprocess.run([sys.executable, "-m", "dit_fast.cli", "selftest", "--help"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0 and "usage: dit-fast selftest" in r.stdout and "--interpreter" in r.stdout
