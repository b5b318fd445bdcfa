"""Launch helpers shared by the row-wise Triton kernels (ln_modulate, gated_residual, gelu).

No @triton.jit code here: only block sizes, warp counts, (N, D) parameter row strides and the
per-batch token chunking that the backward kernels use for their deterministic partial sums.
"""

import torch
import triton

# Per-row kernels keep a whole row in registers: BLOCK_D = next_power_of_2(D) elements.
MAX_BLOCK_D = 16384


def block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(max(D, 1)))


# Row kernels process ROWS rows per program as a [ROWS, BLOCK_D] tile of about this many elements
# (narrow rows, e.g. D = 72, would otherwise leave most of a warp idle).
TILE_ELEMS = 4096


def rows_per_program(BLOCK_D: int) -> int:
    return max(1, min(32, TILE_ELEMS // BLOCK_D))


def tile_warps(ROWS: int, BLOCK_D: int) -> int:
    """~16 fp32 elements per thread: 1 to 8 warps (16 for very wide rows)."""
    return int(min(max(ROWS * BLOCK_D // 512, 1), 16 if BLOCK_D >= 8192 else 8))


def row_stride(t: torch.Tensor, D: int) -> int:
    """Row stride of an (N, D) parameter with unit stride along D (chunks of DiT's adaLN output
    are read in place; a single row or an expanded one has stride D or 0)."""
    return t.stride(0) if t.shape[0] > 1 else D


def unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


# Backward programs: enough to fill a 132-SM H100 several times over (a program walks its chunk's
# tiles serially, with barriers for the row reductions, and Triton's num_stages does not pipeline
# these dot-free loops: the compiled code has no cp.async at any num_stages, so latency is hidden by
# more programs in flight), with chunks of >= 8 tokens so the per-chunk fp32 partial sums (2 rows
# of D per chunk) stay <= 1/4 of the chunk's bf16 input traffic (x and dy).
TARGET_PROGRAMS = 1024
MIN_CHUNK_TOKENS = 8


def token_chunks(N: int, T: int, ROWS: int,
                 target_programs: int = TARGET_PROGRAMS) -> tuple[int, int]:
    """(chunks per batch entry C, tokens per chunk: a multiple of ROWS) for backward kernels that
    run one program per (n, chunk) and write per-chunk partial parameter gradients, summed
    afterwards in a fixed order. Depends only on the shape (deterministic results)."""
    if T <= 0:
        return 1, ROWS
    want = -(-target_programs // max(N, 1))
    C = max(1, min(want, -(-T // max(MIN_CHUNK_TOKENS, ROWS))))
    per = -(-(-(-T // C)) // ROWS) * ROWS
    return -(-T // per), per


def check_block(D: int, what: str) -> None:
    if block_d(D) > MAX_BLOCK_D:
        raise ValueError(f"{what}: the Triton kernels keep a row of D={D} elements in registers; "
                         f"D > {MAX_BLOCK_D} is not supported (use the cuda or cpu backend)")
