# DiT's transformer blocks (the paper's four conditioning variants, section 3.2) and final layer.
# The adaLN blocks run fused ops across their sub-layers and, when DiT.run_blocks asks, across the
# block boundary (the last residual update with the next LayerNorm-modulate).

from typing import NamedTuple, Optional

import torch.nn as nn
from torch import Tensor

from .. import nvtx
from ..ops import gated_residual, gated_residual_ln_modulate, ln_modulate
from ..ops.linear import linear
from .layers import Attention, CrossAttention, Mlp


class BlockOutput(NamedTuple):
    """What every block returns. x: the residual stream (N, T, D). h: modulate(norm(x), shift, scale)
    (N, T, D) of the LayerNorm-modulate that follows the block, when the block was given `next_norm`
    and fused it with its last residual update; None otherwise."""
    x: Tensor
    h: Optional[Tensor]


#################################################################################
#                             adaLN / adaLN-Zero Blocks                         #
#################################################################################

class DiTBlock(nn.Module):
    """
    A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning.

    `block(x, c)` runs the official block on x (N, T, D) and c (N, D) and returns BlockOutput(x, None);
    `block(x, c).x` is the official output. DiT.run_blocks passes more, to fuse across sub-layers:
      mod:       this block's adaLN_modulation(c) (N, 6D), a view of one GEMM for all blocks;
      h:         modulate(norm1(x), shift_msa, scale_msa) (N, T, D), if the previous block computed it;
      next_norm: (shift (N, D), scale (N, D), eps) of the LayerNorm-modulate after this block (the next
                 block's norm1 or the final layer's): the last residual update is fused with it and
                 its output is returned as h.
    """
    gated = True  # adaLN-Zero: residual gates regressed from c (AdaLNBlock: none)

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(),
            nn.Linear(hidden_size, (6 if self.gated else 4) * hidden_size, bias=True)
        )

    def forward(self, x, c, mod=None, h=None, next_norm=None) -> BlockOutput:
        if mod is None:
            mod = self.adaLN_modulation(c)                                           # (N, 6D) or (N, 4D)
        # .to(x.dtype): under autocast the modulation is bf16 while the residual stream is fp32
        if self.gated:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.to(x.dtype).chunk(6, dim=1)
        else:  # the gated ops with gate = 1: x + 1 * y == x + y exactly
            shift_msa, scale_msa, shift_mlp, scale_mlp = mod.to(x.dtype).chunk(4, dim=1)
            gate_msa = gate_mlp = x.new_ones(1, x.shape[-1]).expand(x.shape[0], -1)  # (N, D)
        if h is None:
            h = ln_modulate(x, shift_msa, scale_msa, self.norm1.eps)                 # (N, T, D) modulate(norm1(x))
        with nvtx.range("attn"):
            a = self.attn(h).to(x.dtype)                                             # (N, T, D)
        # x = x + gate_msa * a, and the MLP's input modulate(norm2(x)) in the same pass
        x, h = gated_residual_ln_modulate(x, a, gate_msa, shift_mlp, scale_mlp, self.norm2.eps)  # (N, T, D) x2
        with nvtx.range("mlp"):
            m = self.mlp(h).to(x.dtype)                                              # (N, T, D)
        if next_norm is None:
            return BlockOutput(gated_residual(x, m, gate_mlp), None)                 # (N, T, D) x + gate_mlp * m
        return BlockOutput(*gated_residual_ln_modulate(x, m, gate_mlp, *next_norm))  # (N, T, D) x2: x, next norm


class AdaLNBlock(DiTBlock):
    """
    adaLN block (paper section 3.2): LayerNorm scale and shift regressed from c, no residual gates.
    Extra parameters: adaLN_modulation.1 (D -> 4D), 4·D² + 4·D per block. Called as DiTBlock.
    """
    gated = False


#################################################################################
#                     Cross-Attention and In-Context Blocks                     #
#################################################################################

class CrossAttentionBlock(nn.Module):
    """
    Cross-attention block (paper section 3.2): a standard pre-LN ViT block with a multi-head
    cross-attention layer after self-attention, attending to the length-two sequence [t, c].
    Extra parameters: norm_cross (2·D) and cross_attn.{q, kv, proj} (4·D² + 4·D) per block.
    `block(x, cond)` returns BlockOutput(x, None).
    """
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x, cond) -> BlockOutput:
        x = x + self.attn(self.norm1(x))                          # (N, T, D)
        x = x + self.cross_attn(self.norm_cross(x), cond)         # (N, T, D); cond: (N, 2, D)
        x = x + self.mlp(self.norm2(x))                           # (N, T, D)
        return BlockOutput(x, None)


class InContextBlock(nn.Module):
    """
    In-context block (paper section 3.2): a standard pre-LN ViT block; t and c travel as two
    extra tokens of the sequence. Extra parameters: the LayerNorm affines (4·D per block).
    `block(x)` returns BlockOutput(x, None).
    """
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x, c=None) -> BlockOutput:
        x = x + self.attn(self.norm1(x))  # (N, T + 2, D)
        x = x + self.mlp(self.norm2(x))   # (N, T + 2, D)
        return BlockOutput(x, None)


BLOCKS = {
    "adaLN-Zero": DiTBlock,
    "adaLN": AdaLNBlock,
    "cross-attention": CrossAttentionBlock,
    "in-context": InContextBlock,
}
BLOCK_TYPES = tuple(BLOCKS)


#################################################################################
#                                  Final Layer                                  #
#################################################################################

class FinalLayer(nn.Module):
    """
    The final layer of DiT: (N, T, D) -> (N, T, p*p*C_out). With `adaptive=False` (cross-attention
    and in-context models) the LayerNorm has a learned affine instead of the adaLN modulation.
    `final_layer(x, c)` is the official layer; DiT.head passes mod (its adaLN_modulation(c), (N, 2D))
    and h (modulate(norm_final(x), shift, scale), fused into the last block's residual update).
    """
    def __init__(self, hidden_size, patch_size, out_channels, adaptive=True):
        super().__init__()
        self.adaptive = adaptive
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(
                nn.SiLU(),
                nn.Linear(hidden_size, 2 * hidden_size, bias=True)
            )

    def forward(self, x, c, mod=None, h=None):
        if h is None:
            if self.adaptive:
                if mod is None:
                    mod = self.adaLN_modulation(c)                   # (N, 2D)
                shift, scale = mod.to(x.dtype).chunk(2, dim=1)       # (N, D) each
                h = ln_modulate(x, shift, scale, self.norm_final.eps)  # (N, T, D)
            else:
                h = self.norm_final(x)                               # (N, T, D)
        return linear(self.linear, h)                                # (N, T, p*p*C_out)
