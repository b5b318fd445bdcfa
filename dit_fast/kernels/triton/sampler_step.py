"""Triton kernel: the fused diffusion sampler step (DDPM / DDIM, epsilon prediction, optional
classifier-free guidance combine). Math, operation order and coefficient layout: see
csrc/common/sampler_step.h. The kernel reproduces the unfused PyTorch code's rounding: it is
launched with enable_fp_fusion=False (no FMA contraction), divides with div_rn, and rounds values
PyTorch computes in the model's bf16/fp16 dtype to that dtype.

Grid: (N * C rows, blocks of S). Outputs sample and pred_xstart in float32.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._embed_common import on_gpu, round_bf16
from ._launch import on_tensor_device

MODE_DDPM_LEARNED_RANGE = 0
MODE_DDPM_FIXED = 1
MODE_DDIM = 2
NUM_COEFS = 8


@triton.jit
def _round_m(v, M_DTYPE: tl.constexpr):
    """Round a float32 value to the model dtype (and back), like a PyTorch op in that dtype."""
    if M_DTYPE == tl.bfloat16:
        return round_bf16(v)
    elif M_DTYPE == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def sampler_step_kernel(m_ptr, x_ptr, noise_ptr, coef_ptr, sample_ptr, pred_ptr, N, C, S, Cm,
                        cfg_scale, guide_channels,
                        MODE: tl.constexpr, CLIP: tl.constexpr, GUIDED: tl.constexpr,
                        HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr, GPU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = row // C
    c = row - n * C
    s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = s < S
    M_DTYPE: tl.constexpr = m_ptr.dtype.element_ty
    k = coef_ptr + n * 8
    c0 = tl.load(k + 0)
    c1 = tl.load(k + 1)
    c2 = tl.load(k + 2)
    c3 = tl.load(k + 3)
    c6 = tl.load(k + 6)

    e = tl.load(m_ptr + (n * Cm + c) * S + s, mask=ok, other=0.0).to(tl.float32)
    if GUIDED:
        g = (s * 0 + c) < guide_channels  # channel c is guided (as a vector: a valid load mask)
        u = tl.load(m_ptr + ((N + n) * Cm + c) * S + s, mask=ok & g, other=0.0).to(tl.float32)
        d = _round_m(e - u, M_DTYPE)
        gs = _round_m(cfg_scale * d, M_DTYPE)
        e = tl.where(g, _round_m(u + gs, M_DTYPE), e)
    xv = tl.load(x_ptr + row * S + s, mask=ok, other=0.0).to(tl.float32)
    px = c0 * xv - c1 * e
    if CLIP:
        px = tl.where(px < -1.0, -1.0, tl.where(px > 1.0, 1.0, px))
    tl.store(pred_ptr + row * S + s, px, mask=ok)

    if MODE == 2:  # DDIM
        eps = tl.math.div_rn(c0 * xv - px, c1)
        r = px * c2 + c3 * eps
        if HAS_NOISE:
            z = tl.load(noise_ptr + row * S + s, mask=ok, other=0.0).to(tl.float32)
            r = r + c6 * z
    else:  # DDPM
        r = c2 * px + c3 * xv
        if HAS_NOISE:
            c4 = tl.load(k + 4)
            if MODE == 0:
                c5 = tl.load(k + 5)
                v = tl.load(m_ptr + (n * Cm + C + c) * S + s, mask=ok, other=0.0).to(tl.float32)
                frac = _round_m(_round_m(v + 1.0, M_DTYPE) / 2.0, M_DTYPE)
                omf = _round_m(1.0 - frac, M_DTYPE)
                lv = frac * c5 + omf * c4
            else:
                lv = c4 + tl.zeros((BLOCK,), dtype=tl.float32)
            if GPU:
                sd = c6 * libdevice.exp(0.5 * lv)
            else:
                sd = c6 * tl.exp(0.5 * lv)
            z = tl.load(noise_ptr + row * S + s, mask=ok, other=0.0).to(tl.float32)
            r = r + sd * z
    tl.store(sample_ptr + row * S + s, r, mask=ok)


@on_tensor_device
def sampler_step(model_out, x, noise, coefs, mode, clip, guided, cfg_scale, guide_channels):
    """model_out (Bm, Cm, S), x (N, C, S), noise (N, C, S) or None, coefs (N, 8) float32
    -> (sample, pred_xstart), float32 (N, C, S). All contiguous."""
    N, C, S = x.shape
    sample = torch.empty((N, C, S), device=x.device, dtype=torch.float32)
    pred = torch.empty_like(sample)
    if N * C * S == 0:
        return sample, pred
    BLOCK = max(16, min(1024, triton.next_power_of_2(S)))
    grid = (N * C, triton.cdiv(S, BLOCK))
    sampler_step_kernel[grid](
        model_out, x, noise if noise is not None else x, coefs, sample, pred, N, C, S,
        model_out.shape[1], float(cfg_scale), int(guide_channels), MODE=int(mode), CLIP=bool(clip),
        GUIDED=bool(guided), HAS_NOISE=noise is not None, BLOCK=BLOCK, GPU=on_gpu(x),
        enable_fp_fusion=False)
    return sample, pred


def _spec(m_ty, x_ty, mode, guided):
    c = dict(MODE=mode, CLIP=False, GUIDED=guided, HAS_NOISE=True, BLOCK=1024, GPU=True)
    sig = {"m_ptr": f"*{m_ty}", "x_ptr": f"*{x_ty}", "noise_ptr": f"*{x_ty}", "coef_ptr": "*fp32",
           "sample_ptr": "*fp32", "pred_ptr": "*fp32", "N": "i32", "C": "i32", "S": "i32",
           "Cm": "i32", "cfg_scale": "fp32", "guide_channels": "i32"}
    sig.update({k: "constexpr" for k in c})
    return (sampler_step_kernel, sig, c)


AOT_SPECS = [_spec("fp32", "fp32", MODE_DDPM_LEARNED_RANGE, False),
             _spec("fp32", "fp32", MODE_DDIM, False),
             _spec("bf16", "fp32", MODE_DDPM_LEARNED_RANGE, True),
             _spec("bf16", "bf16", MODE_DDIM, True)]
