"""The benchmark scripts in bench/: a smoke run of throughput.py on a tiny configuration (JSON schema,
derived columns, chart), its GEMM list against dit_fast.flops, gflops.py's table, report.py's rendering
and README rewriting. Timings themselves are never asserted (speed is shown by the benchmarks)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dit_fast import backends
from dit_fast.flops import PAPER_GFLOPS, dit_gflops, true_gflop_per_image

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))  # gflops.py imports throughput
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


throughput = _load("throughput")
gflops = _load("gflops")
report = _load("report")

ROW_KEYS = {"impl", "mode", "model", "batch", "dtype", "ms", "ms_min", "ms_max", "img_per_s", "gflops", "gflop_fwd",
            "gflop", "tflops", "mfu", "speedup", "speedup_min", "gemm_ms", "gemm_eff", "full_sample_s"}


# ---------------------------------------------------------------------------- throughput.py

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "tiny.json"
    cmd = [sys.executable, str(BENCH / "throughput.py"), "--model", "DiT-S/8", "--image-size", "64", "--depth", "2",
           "--batch-size", "2", "--quick", "--threads", "1", "--impls", "reference,dit_fast", "--dtype", "fp32",
           "--peak-size", "256", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), out, proc.stdout


@pytest.mark.slow
def test_quick_run_schema(quick_run):
    result, out, stdout = quick_run
    assert {"device", "rows", "peak_tflops", "model", "batch", "torch", "date", "command"} <= set(result)
    impls = ["reference"] + (["dit_fast[cpu]"] if backends()["cpu"].available else [])
    assert [(r["mode"], r["impl"]) for r in result["rows"]] == [(m, i) for m in throughput.MODES for i in impls]
    fwd = true_gflop_per_image("DiT-S/8", 64, depth=2)
    for r in result["rows"]:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert (r["model"], r["batch"], r["dtype"]) == ("DiT-S/8", 2, "fp32")
        assert r["ms_min"] <= r["ms"] <= r["ms_max"] and r["ms"] > 0
        assert r["img_per_s"] == pytest.approx(2 / (r["ms"] / 1e3))
        assert r["gflops"] == pytest.approx(dit_gflops("DiT-S/8", 64, depth=2))
        assert r["gflop"] == pytest.approx(throughput.MODE_FLOP_FACTOR[r["mode"]] * fwd)
        assert r["tflops"] == pytest.approx(r["gflop"] * 2 / (r["ms"] / 1e3) / 1e3)
        assert r["mfu"] == pytest.approx(r["tflops"] / result["peak_tflops"]["fp32"])
        assert r["gemm_ms"] > 0 and r["gemm_eff"] == pytest.approx(r["gemm_ms"] / r["ms"])
        ref = next(x for x in result["rows"] if x["mode"] == r["mode"] and x["impl"] == "reference")
        assert r["speedup"] == pytest.approx(ref["ms"] / r["ms"])
        assert r["speedup_min"] == pytest.approx(ref["ms_min"] / r["ms_min"])
        if r["mode"] == "sample":
            assert r["full_sample_s"] == pytest.approx(r["ms"] * 250 / 1e3)
        else:
            assert r["full_sample_s"] is None
    assert result["gemm_gflop"]["forward"] == pytest.approx(2 * fwd)
    if backends()["cpu"].available:  # the cpu kernels were validated once, in the warm-up
        runs = result["validation"]["runs"]
        assert runs and all(v["backend"] == "cpu" and v["error"] is None for v in runs)
        assert result["validation"]["one_time_s"] == pytest.approx(sum(v["seconds"] for v in runs), abs=1e-3)
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "train:" in stdout and "250-step guided sample" in stdout


def test_gemm_list_matches_flop_count():
    for model in ("DiT-S/2", "DiT-B/4", "DiT-XL/2", "DiT-L/8"):
        fwd = throughput.gemm_shapes(model, 256, 3, "forward")
        assert throughput.gemm_gflop(fwd) == pytest.approx(3 * true_gflop_per_image(model, 256), rel=1e-12)
        sample = throughput.gemm_shapes(model, 256, 3, "sample")
        assert throughput.gemm_gflop(sample) == pytest.approx(2 * throughput.gemm_gflop(fwd))
        # Training: both gradients of every GEMM except the input gradients nobody needs.
        train = throughput.gemm_gflop(throughput.gemm_shapes(model, 256, 3, "train"))
        assert 2.99 * throughput.gemm_gflop(fwd) < train < 3 * throughput.gemm_gflop(fwd)
    with pytest.raises(ValueError, match="mode"):
        throughput.gemm_shapes("DiT-S/2", 256, 1, "infer")


def test_time_gemms_runs_every_layout():
    shapes = {(1, 8, 16, 4, "nt"): 2, (1, 8, 16, 4, "nn"): 1, (1, 8, 16, 4, "tn"): 1, (3, 8, 16, 4, "nn"): 1,
              (3, 8, 16, 4, "tn"): 1, (3, 8, 16, 4, "nt"): 1}
    import torch
    assert throughput.time_gemms(shapes, torch.device("cpu"), torch.float32, reps=1) > 0


@pytest.mark.parametrize("argv,name", [
    (["--modes", "forward,infer"], "--modes"), (["--dtype", "fp8"], "--dtype"), (["--impls", "mine"], "--impls"),
    (["--model", "DiT-XXL/2"], "--model"), (["--batch-size", "0"], "--batch-size"),
    (["--model", "DiT-S/8", "--image-size", "96"], "--image-size"), (["--warmup", "-1"], "--warmup"),
])
def test_bad_arguments_name_the_argument(argv, name, capsys):
    with pytest.raises(SystemExit) as e:
        throughput.parse_args(argv)
    assert e.value.code == 2
    assert name in capsys.readouterr().err


# ---------------------------------------------------------------------------- gflops.py

@pytest.mark.slow
def test_gflops_table():
    rows = {r["model"]: r for r in gflops.gflops_table()}
    assert list(rows) == [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (8, 4, 2)]
    printed = {"DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/8": 1.42, "DiT-B/4": 5.56,
               "DiT-B/2": 23.01, "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71, "DiT-XL/8": 7.39,
               "DiT-XL/4": 29.05, "DiT-XL/2": 118.64}
    for name, r in rows.items():
        assert r["paper_gflops"] == printed[name] == PAPER_GFLOPS[(name, 256)]
        assert abs(r["deviation"]) < 0.01 and r["gflops"] == pytest.approx(dit_gflops(name))
        assert r["gflop_true"] == pytest.approx(true_gflop_per_image(name))
    assert round(rows["DiT-XL/2"]["gflops"], 2) == 118.64
    # The disputed entry carries both readings and a flag; no other entry is flagged.
    assert rows["DiT-L/8"]["alt_paper_gflops"] == 5.73 and "5.73" in rows["DiT-L/8"]["flag"]
    assert [n for n, r in rows.items() if r["flag"]] == ["DiT-L/8"]
    # Parameter counts of Table 4's models (official configurations): S 33M, B 130M, L 458M, XL 675M.
    for size, params in (("S", 33), ("B", 130), ("L", 458), ("XL", 675)):
        assert abs(rows[f"DiT-{size}/2"]["params_m"] - params) < 1, (size, rows[f"DiT-{size}/2"]["params_m"])


def test_gflops_cli_table_only(tmp_path, capsys):
    out = tmp_path / "g.json"
    result = gflops.main(["--no-time", "--models", "DiT-S/8,DiT-L/8", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert [r["model"] for r in result["rows"]] == ["DiT-S/8", "DiT-L/8"] and not result["timed"]
    assert "(!) DiT-L/8" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gflops.parse_args(["--models", "DiT-S/16"])
    assert "--models" in capsys.readouterr().err


# ---------------------------------------------------------------------------- report.py

def _result():
    row = dict(model="DiT-S/2", image_size=256, batch=8, dtype="fp32", gflops=6.06, gflop_fwd=12.11,
               ms_min=90.0, ms_max=110.0, iters=3, gemm_ms=80.0)
    rows = []
    for mode, factor in (("forward", 1), ("train", 3), ("sample", 2)):
        for impl, ms in (("reference", 100.0), ("dit_fast[cpu]", 80.0)):
            ms = ms * factor
            tflops = factor * 12.11 * 8 / (ms / 1e3) / 1e3
            rows.append(dict(row, impl=impl, mode=mode, ms=ms, img_per_s=8 / (ms / 1e3), gflop=factor * 12.11,
                             tflops=tflops, mfu=tflops / 10.0, speedup=100.0 * factor / ms, speedup_min=1.0, gemm_eff=80.0 / ms,
                             full_sample_s=ms * 250 / 1e3 if mode == "sample" else None))
    return dict(device="Test CPU (2 threads)", device_type="cpu", cpu_count=2, torch="2.13.0", date="2026-01-01 00:00 UTC",
                load_avg_start=[3.5, 3.0, 2.0], load_avg_end=[3.0, 3.0, 2.0], note="loaded machine", model="DiT-S/2",
                image_size=256, batch=8, warmup=1, iters=3, sample_steps=250, peak_tflops={"fp32": 10.0},
                skipped={"dit_fast[cuda]": "no CUDA device"}, rows=rows, command="python bench/throughput.py")


def test_report_renders_deterministically(tmp_path):
    path = tmp_path / "cpu-DiT-S_2.json"
    path.write_text(json.dumps(_result()))
    md = report.render(report.load([path]), tmp_path)
    assert md == report.render(report.load([str(path), path]), tmp_path)  # same input, same text
    lines = md.splitlines()
    assert "### DiT-S/2 @ 256 px, batch 8 — Test CPU (2 threads)" in lines
    assert ("**Test CPU (2 threads)**, 2 CPUs, torch 2.13.0, 2026-01-01 00:00 UTC; load average at start / end: "
            "3.50 / 3.00.") in lines
    assert "Note: loaded machine" in lines
    assert "| forward | reference | fp32 | 100.0 (90.0–110.0) | 80.00 | 6.06 | 12.11 | 0.969 | 9.7% | 80% | 1.00x / 1.00x |" \
        in lines
    assert "| train | dit_fast[cpu] | fp32 | 240.0 (90.0–110.0) | 33.33 | 6.06 | 36.33 | 1.211 | 12.1% | 33% | 1.25x / 1.00x |" \
        in lines
    assert any(line.startswith("Full 250-step guided sampling") and "dit_fast[cpu] fp32 40.0 s" in line for line in lines)
    assert "Not run here: dit_fast[cuda] (no CUDA device)." in lines
    assert "![" not in md  # no PNG beside the JSON
    path.with_suffix(".png").write_bytes(b"png")
    assert "![DiT-S/2 throughput](cpu-DiT-S_2.png)" in report.render(report.load([path]), tmp_path)


def test_report_rewrites_only_the_block(tmp_path, capsys):
    res = tmp_path / "r.json"
    res.write_text(json.dumps(_result()))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n{report.BEGIN}\nold table\n{report.END}\n\n## after\n")
    assert report.main([str(res), "--readme", str(readme), "--check"]) == 1
    assert report.main([str(res), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n" + report.BEGIN + "\n") and text.endswith(report.END + "\n\n## after\n")
    assert "old table" not in text and "| sample | reference | fp32 |" in text
    assert report.main([str(res), "--readme", str(readme), "--check"]) == 0
    assert report.main([str(res), "--readme", str(readme)]) == 0 and readme.read_text() == text  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit):
        report.main([str(res), "--readme", str(readme)])
    assert "--readme" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit):
        report.main([str(bad), "--print"])
    assert "not a bench result" in capsys.readouterr().err


def test_readme_results_block_is_generated():
    """bench/README.md's results block is what report.py renders from the JSON it names (paths
    relative to bench/), and it is report.py's default target."""
    readme = ROOT / "bench" / "README.md"
    text = readme.read_text()
    head = text.split(report.BEGIN, 1)[1].split("\n", 2)[1]
    assert head.startswith("<!-- generated by bench/report.py from "), head
    files = [readme.parent / f for f in head[len("<!-- generated by bench/report.py from "):-len("; do not edit by hand -->")]
             .split(", ")]
    assert files and all(f.exists() for f in files), files
    assert report.replace_block(text, report.render(report.load(files), readme.parent)) == text
    assert report.main([str(f) for f in files] + ["--check"]) == 0  # the default --readme
    assert report.BEGIN not in (ROOT / "README.md").read_text()  # one generated block, in bench/README.md


def test_bench_folder_is_not_in_the_test_suite():
    """`python -m pytest -q` collects tests/ only: the microbenchmarks in bench/ must not run in CI."""
    import tomllib
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert config["testpaths"] == ["tests"]
