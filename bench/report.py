"""Markdown tables from benchmark JSON files (bench/throughput.py, bench/gflops.py), written into
bench/README.md.

    python bench/report.py bench/results/*.json              # rewrite bench/README.md's results block
    python bench/report.py bench/results/*.json --print      # print the markdown only
    python bench/report.py bench/results/*.json --check      # exit 1 if bench/README.md's block is stale

The block is the text between the lines `<!-- results:begin -->` and `<!-- results:end -->` of the
file given by --readme (default bench/README.md); everything else is left as it is. Paths in the
block are relative to that file's folder. The output depends only on the JSON files (sorted by name),
so the same files always give the same text.
"""
import argparse
import json
import os
import sys
from pathlib import Path

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
MODE_ORDER = {"forward": 0, "train": 1, "sample": 2}


def load(paths):
    """[(path, result dict)] sorted by file name; a clear error for files that are not results."""
    out = []
    for p in sorted({Path(p) for p in paths}, key=lambda q: q.name):
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: not a readable JSON file ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or "device" not in data:
            raise ValueError(f"{p}: not a bench result (needs 'device' and a 'rows' list)")
        out.append((p, data))
    return out


def _f(v, fmt, none="-"):
    return none if v is None else format(v, fmt)


def _speedup(x):
    med, low = x.get("speedup"), x.get("speedup_min")
    if med is None:
        return "-"
    return f"{med:.2f}x" + (f" / {low:.2f}x" if low is not None else "")


def _pct(v, fmt):
    return "-" if v is None else format(100 * v, fmt) + "%"


def _machine(r):
    parts = [f"**{r['device']}**"]
    if r.get("device_type") == "cpu" and r.get("cpu_count"):
        parts.append(f"{r['cpu_count']} CPUs")
    parts.append(f"torch {r.get('torch', '?')}")
    if r.get("date"):
        parts.append(r["date"])
    line = ", ".join(parts)
    la, lb = r.get("load_avg_start"), r.get("load_avg_end")
    if la or lb:
        line += f"; load average at start / end: {_f(la and la[0], '.2f')} / {_f(lb and lb[0], '.2f')}"
    return line


def render_throughput(r, image):
    mdl = r["model"] + (f" (depth {r['depth_override']})" if r.get("depth_override") else "")
    lines = [f"### {mdl} @ {r['image_size']} px, batch {r['batch']} — {r['device']}", "", _machine(r) + "."]
    if r.get("note"):
        lines.append(f"Note: {r['note']}")
    if r.get("quick"):
        lines.append("(`--quick` smoke run: too few turns to be a measurement.)")
    peaks = r.get("peak_tflops") or {}
    lines.append("Peak matmul throughput measured in the same run: "
                 + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in sorted(peaks.items())) + ".")
    lines.append(f"Median of {r.get('iters', '?')} turns after {r.get('warmup', '?')} warm-up; "
                 f"Command: `{r.get('command', 'python bench/throughput.py')}`")
    lines += ["", "| mode | impl | dtype | ms (min–max) | img/s | Gflops | GFLOP/img | TFLOP/s | MFU | GEMM eff "
                  "| speedup (median / min) |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = sorted(r["rows"], key=lambda x: MODE_ORDER.get(x["mode"], 9))  # stable: keeps the run's order
    for x in rows:
        lines.append(
            f"| {x['mode']} | {x['impl']} | {x['dtype']} | {x['ms']:.1f} ({x['ms_min']:.1f}–{x['ms_max']:.1f}) "
            f"| {x['img_per_s']:.2f} | {x['gflops']:.2f} | {x['gflop']:.2f} | {x['tflops']:.3f} "
            f"| {_pct(x.get('mfu'), '.1f')} | {_pct(x.get('gemm_eff'), '.0f')} "
            f"| {_speedup(x)} |")
    samples = [x for x in rows if x["mode"] == "sample" and x.get("full_sample_s") is not None]
    if samples:
        lines += ["", f"Full {r.get('sample_steps', 250)}-step guided sampling of the batch (derived: steps x "
                      "one step): " + "; ".join(f"{x['impl']} {x['dtype']} {x['full_sample_s']:.1f} s" for x in samples)
                  + "."]
    if r.get("skipped"):
        lines += ["", "Not run here: " + "; ".join(f"{k} ({v})" for k, v in sorted(r["skipped"].items())) + "."]
    if image:
        lines += ["", f"![{r['model']} throughput]({image})"]
    return lines


def render_gflops(r, image):
    lines = [f"### Gflops vs forward throughput (Table 4 models) — {r['device']}", "", _machine(r) + "."]
    if r.get("note"):
        lines.append(f"Note: {r['note']}")
    timed = r.get("timed", True)
    if timed:
        lines.append(f"Forward of batch {r['batch']}, {r['dtype']}, backend {r.get('backend', 'auto')}; median of "
                     f"{r.get('iters', '?')}. Command: `{r.get('command', 'python bench/gflops.py')}`")
    head = "| model | params (M) | Gflops (dit_fast) | paper | deviation |" + (" ms | img/s | TFLOP/s |" if timed else "")
    lines += ["", head, "| --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if timed else "")]
    for x in r["rows"]:
        paper = _f(x.get("paper_gflops"), ".2f")
        if x.get("alt_paper_gflops") is not None:
            paper += f" (or {x['alt_paper_gflops']:.2f} (!))"
        line = (f"| {x['model']} | {x['params_m']:.1f} | {x['gflops']:.2f} | {paper} "
                f"| {_pct(x.get('deviation'), '+.2f')} |")
        if timed:
            line += f" {_f(x.get('ms'), '.1f')} | {_f(x.get('img_per_s'), '.2f')} | {_f(x.get('tflops'), '.3f')} |"
        lines.append(line)
    for x in r["rows"]:
        if x.get("flag"):
            lines.append(f"\n(!) {x['model']}: {x['flag']}")
    if image:
        lines += ["", f"![Gflops vs throughput]({image})"]
    return lines


def render(results, base_dir):
    """Markdown for [(path, result)]; images are linked relative to base_dir when the PNG exists."""
    out = ["<!-- generated by bench/report.py from "
           + ", ".join(_rel(p, base_dir) for p, _ in results) + "; do not edit by hand -->"]
    for path, r in results:
        png = path.with_suffix(".png")
        image = _rel(png, base_dir) if png.exists() else None
        kind = r.get("kind") or ("gflops" if r["rows"] and "mode" not in r["rows"][0] else "throughput")
        out += [""] + (render_gflops(r, image) if kind == "gflops" else render_throughput(r, image))
    return "\n".join(out) + "\n"


def _rel(path, base_dir):
    return Path(os.path.relpath(Path(path).resolve(), Path(base_dir).resolve())).as_posix()


def replace_block(text, block):
    """text with the lines between BEGIN and END replaced by `block`."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"the file must contain exactly one '{BEGIN}' line followed by one '{END}' line")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="JSON files written by bench/throughput.py or bench/gflops.py")
    p.add_argument("--readme", default=str(Path(__file__).resolve().parent / "README.md"),
                   help="markdown file holding the results block (default: bench/README.md)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--print", action="store_true", help="print the markdown, change nothing")
    g.add_argument("--check", action="store_true", help="exit 1 if the README's block differs from the JSON's")
    args = p.parse_args(argv)
    try:
        results = load(args.results)
    except ValueError as e:
        p.error(f"results: {e}")
    readme = Path(args.readme)
    md = render(results, readme.parent)
    if args.print:
        sys.stdout.write(md)
        return 0
    try:
        text = readme.read_text()
        new = replace_block(text, md)
    except (OSError, ValueError) as e:
        p.error(f"--readme {readme}: {e}")
    if args.check:
        if new != text:
            print(f"{readme}: results block is stale (run: python bench/report.py {' '.join(args.results)})")
            return 1
        print(f"{readme}: results block is up to date")
        return 0
    readme.write_text(new)
    print(f"rewrote the results block of {readme} from {len(results)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
