"""Registers, stages, shared memory, instruction mix and head-dim padding of every Triton attention
launch configuration, from an ahead-of-time compile (no GPU needed; nothing is timed).

    python bench/triton_attention_aot.py [--archs 90,80] [--out bench/results/triton-attention-aot]

Writes <out>.json (one record per kernel x config x arch) and <out>.md (a table). Run with
TRITON_INTERPRET unset (the kernels must be real @triton.jit objects).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Registers per SM and the per-block shared-memory maximum (opt-in), for occupancy estimates.
REGS_PER_SM = 65536
MAX_SHARED = {80: 166912, 90: 232448}


def _ctas_per_sm(st: dict, arch: int) -> int:
    threads = 32 * st["num_warps"]
    by_regs = REGS_PER_SM // (-(-st["regs"] // 8) * 8 * threads)
    by_smem = MAX_SHARED[arch] // max(st["shared_bytes"], 1)
    return int(min(by_regs, by_smem))


def collect(archs: list[int]) -> list[dict]:
    import triton

    from dit_fast.kernels.triton import _aot
    from dit_fast.kernels.triton import attention as A

    rows = []
    for spec in A.AOT_SPECS:
        fn, sig, consts, opts = spec
        dtype = sig.get("QKV", sig.get("O"))[1:]
        hd = consts["HEAD_DIM"]
        width = (consts["BLOCK_D0"] + consts["BLOCK_D1"]) if "BLOCK_D0" in consts \
            else consts["BLOCK_D"]
        for arch in archs:
            st = _aot.kernel_stats(_aot.compile_spec(spec, arch))
            rows.append(dict(
                kernel=fn.__name__.removeprefix("_attn_").removesuffix("_kernel"), arch=arch,
                dtype=dtype, head_dim=hd,
                precision=consts.get("DOT_PRECISION", "-") if dtype == "fp32" else "-",
                head_blocks=(f"{consts['BLOCK_D0']}+{consts['BLOCK_D1']}" if consts.get("BLOCK_D1")
                             else str(width)),
                padding=round(1 - hd / width, 3),
                padding_one_block=round(1 - hd / max(16, triton.next_power_of_2(hd)), 3),
                block_m=consts["BLOCK_M"], block_n=consts.get("BLOCK_N"),
                **st, ctas_per_sm=_ctas_per_sm(st, arch)))
    return rows


def markdown(rows: list[dict]) -> str:
    cols = ["arch", "dtype", "head_dim", "precision", "kernel", "head_blocks", "padding",
            "padding_one_block", "block_m", "block_n", "num_warps", "num_stages", "regs",
            "spill_bytes", "shared_bytes", "ctas_per_sm", "wgmma", "mma", "fma"]
    lines = ["# Triton attention: ahead-of-time compile of every launch configuration", "",
             "From `python bench/triton_attention_aot.py` (triton.compile for each arch; no GPU, "
             "nothing timed). padding = wasted fraction of the head-dim columns of every MMA "
             "(head_blocks: one block, or two parts); padding_one_block = the same with one "
             "power-of-2 block (before the split). regs from cuobjdump; ctas_per_sm = min(by "
             "registers, by shared memory). wgmma / mma / fma: static PTX instruction counts. "
             "bwd_preprocess has no MMA (its padding is idle lanes). precision: fp32 only (16-bit "
             "dots always use tensor cores).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: (-r["arch"], r["dtype"], r["head_dim"], r["precision"])):
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="90,80")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "triton-attention-aot"))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET (ahead-of-time compilation needs real kernels)",
              file=sys.stderr)
        return 2
    try:
        archs = [int(a) for a in args.archs.split(",") if a.strip()]
    except ValueError:
        print(f"error: --archs must be comma-separated integers like 90,80, got {args.archs!r}",
              file=sys.stderr)
        return 2
    if not archs or any(a not in MAX_SHARED for a in archs):
        print(f"error: --archs must be among {sorted(MAX_SHARED)}, got {args.archs!r}",
              file=sys.stderr)
        return 2
    rows = collect(archs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
