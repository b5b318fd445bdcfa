# Drop-in reimplementation of the official DiT model (facebookresearch/DiT, models.py):
# same constructor arguments, same state_dict keys and shapes, same outputs.
# References:
# GLIDE: https://github.com/openai/glide-text2im
# MAE: https://github.com/facebookresearch/mae/blob/main/models_mae.py
#
# Beyond the official release:
# - `block=` selects one of the paper's four conditioning blocks (section 3.2):
#   "adaLN-Zero" (default, the official layout), "adaLN", "cross-attention", "in-context".
# - `forward_with_cfg(..., guide_channels="all")` guides every latent channel; the default (3)
#   reproduces the official code, which guides the first three channels only.
# - Inputs are validated (ValueError naming the argument); the model runs in bfloat16.
# - timm is not needed: PatchEmbed, Attention and Mlp are written here with timm's parameter names.
# - The forward pass runs dit_fast's fused ops (dit_fast.ops; each picks a backend: cuda, triton, cpu
#   or reference, see dit_fast._backends), with the same parameters and state_dict keys:
#     patch_embed      PatchEmbed's conv + pos_embed as one GEMM with a fused epilogue
#     timestep_embedding + adaln_projections
#                      the sinusoidal embedding in one kernel; the adaLN projections of ALL blocks
#                      and of the final layer as ONE GEMM (they all read the same c) over their
#                      weights, which are views into one stacked buffer
#     ln_modulate      modulate(norm1(x), shift, scale) in one pass
#     attention_qkv    attention straight from the qkv Linear's output
#     gated_residual_ln_modulate
#                      x + gate * y fused with the LayerNorm-modulate that follows it: the
#                      attention residual with the MLP's, and a block's last residual with the next
#                      block's (or the final layer's) input norm
#     linear_gelu      fc1 with the bias + GELU(tanh) as the GEMM's epilogue
#     unpatchify       the einsum as one gather
#     linear           qkv / proj / fc2 / final Linear in CPU float32 / bf16 inference: the
#                      fastest GEMM measured for the CPU (oneDNN or dit_fast's packed GEMM, bias and
#                      fc1's GELU in the epilogue) instead of torch's BLAS; also under torch.compile
#   Under dit_fast.use_backend("reference") every op runs the official PyTorch expressions and
#   the adaLN projections run one Linear per layer, so the output is bit-identical to the official
#   model's in float32 (tests/test_model.py, tests/test_diffusion.py).
# - NVTX ranges around the blocks and ops when profiling (dit_fast.nvtx, DIT_FAST_NVTX=1).

import math
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _backends, nvtx
from ..ops import (attention_qkv, gated_residual, gated_residual_ln_modulate, linear_gelu,
                   ln_modulate, patch_embed, timestep_embedding)
from ..ops import unpatchify as unpatchify_tokens
from ..ops.adaln import adaln_projections, share_adaln_storage
from ..ops.linear import linear

BLOCK_TYPES = ("adaLN-Zero", "adaLN", "cross-attention", "in-context")


def modulate(x, shift, scale):
    """The official modulate(); blocks call the fused `ln_modulate(x, shift, scale)` =
    modulate(LayerNorm(x), shift, scale) instead."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _is_tracing() -> bool:
    """True under torch.compile / CUDA-graph capture, where data-dependent checks must not run."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


#################################################################################
#                   Layers with timm's parameter names                          #
#################################################################################

class PatchEmbed(nn.Module):
    """2D image to patch embedding: (N, C, H, W) -> (N, T, D). Keys: proj.weight, proj.bias."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        x = self.proj(x)                                # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)             # (N, T, D)


class Attention(nn.Module):
    """Multi-head self-attention. Keys: qkv.weight, qkv.bias, proj.weight, proj.bias."""

    def __init__(self, dim, num_heads=8, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        qkv = linear(self.qkv, x)                        # (N, T, 3D), packed (3, H, Dh) per token
        x = attention_qkv(qkv, self.num_heads)           # (N, T, D), q/k/v read in place
        return linear(self.proj, x)                      # (N, T, D)


class CrossAttention(nn.Module):
    """Multi-head cross-attention from image tokens to a conditioning sequence.
    Keys: q.weight, q.bias, kv.weight, kv.bias, proj.weight, proj.bias."""

    def __init__(self, dim, num_heads=8):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cond):
        N, T, D = x.shape
        S = cond.shape[1]
        q = self.q(x).reshape(N, T, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, T, Dh)
        kv = self.kv(cond).reshape(N, S, 2, self.num_heads, self.head_dim)        # (N, S, 2, H, Dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)                                 # 2 x (N, H, S, Dh)
        x = F.scaled_dot_product_attention(q, k, v)                                # (N, H, T, Dh)
        x = x.transpose(1, 2).reshape(N, T, D)                                     # (N, T, D)
        return self.proj(x)                                                        # (N, T, D)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2. Keys: fc1.weight, fc1.bias, fc2.weight, fc2.bias.
    fc1's bias and the GELU (`act`) run as the fc1 GEMM's epilogue (ops.linear_gelu)."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        h = linear_gelu(x, self.fc1.weight, self.fc1.bias)  # (N, T, M) = act(fc1(x))
        return linear(self.fc2, h)                          # (N, T, D)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """
    Embeds scalar timesteps into vector representations.
    """
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """
        Create sinusoidal timestep embeddings.
        :param t: a 1-D Tensor of N indices, one per batch element.
                          These may be fractional.
        :param dim: the dimension of the output.
        :param max_period: controls the minimum frequency of the embeddings.
        :return: an (N, D) Tensor of positional embeddings (float32).
        """
        # https://github.com/openai/glide-text2im/blob/main/glide_text2im/nn.py
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        dtype = self.mlp[0].weight.dtype
        if self.timestep_embedding is not _OFFICIAL_TIMESTEP_EMBEDDING:     # overridden (subclass / patch)
            t_freq = self.timestep_embedding(t, self.frequency_embedding_size).to(dtype)  # (N, 256)
            return self.mlp(t_freq)                                         # (N, D)
        if t.dtype not in (torch.float32, torch.float64, torch.int32, torch.int64):
            t = t.float()                                                   # as timestep_embedding does
        # = self.timestep_embedding(t, 256).to(model dtype), in one kernel (float32 math)
        t_freq = timestep_embedding(t.contiguous(), self.frequency_embedding_size, dtype=dtype)  # (N, 256)
        return self.mlp(t_freq)                                             # (N, D)


_OFFICIAL_TIMESTEP_EMBEDDING = TimestepEmbedder.timestep_embedding


class LabelEmbedder(nn.Module):
    """
    Embeds class labels into vector representations. Also handles label dropout for classifier-free guidance.
    """
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """
        Drops labels to enable classifier-free guidance.
        """
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        labels = torch.where(drop_ids, self.num_classes, labels)
        return labels

    def forward(self, labels, train, force_drop_ids=None):
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        embeddings = self.embedding_table(labels)
        return embeddings


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

_FUSED_BLOCK_ARGS = """
    `block(x, c)` is the official block. DiT.forward passes more, to fuse across sub-layers:
      mod:       this block's adaLN_modulation(c) (N, kD): a view of the one GEMM for all blocks;
      h:         modulate(norm1(x), shift_msa, scale_msa), if the previous block already computed it
                 (fused with its last residual update);
      next_norm: (shift, scale, eps) of the LayerNorm-modulate that follows this block (the next
                 block's norm1 or the final layer's): the last residual update is fused with it and
                 the block returns (x, modulate(norm(x), shift, scale)) instead of x.
    """


class DiTBlock(nn.Module):
    __doc__ = """
    A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning.
    """ + _FUSED_BLOCK_ARGS
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(),
            nn.Linear(hidden_size, 6 * hidden_size, bias=True)
        )

    def forward(self, x, c, mod=None, h=None, next_norm=None):
        if mod is None:
            mod = self.adaLN_modulation(c)                                           # (N, 6D)
        # .to(x.dtype): under autocast the (N, 6D) modulation is bf16 while the residual stream is fp32
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.to(x.dtype).chunk(6, dim=1)
        if h is None:
            h = ln_modulate(x, shift_msa, scale_msa, self.norm1.eps)                 # (N, T, D) modulate(norm1(x))
        with nvtx.range("attn"):
            a = self.attn(h).to(x.dtype)                                             # (N, T, D)
        # x = x + gate_msa * a, and the MLP's input modulate(norm2(x)) in the same pass
        x, h = gated_residual_ln_modulate(x, a, gate_msa, shift_mlp, scale_mlp, self.norm2.eps)  # (N, T, D) x2
        with nvtx.range("mlp"):
            m = self.mlp(h).to(x.dtype)                                              # (N, T, D)
        if next_norm is None:
            return gated_residual(x, m, gate_mlp)                                    # (N, T, D) x + gate_mlp * m
        return gated_residual_ln_modulate(x, m, gate_mlp, *next_norm)                # (N, T, D) x2: x, next norm


class AdaLNBlock(nn.Module):
    __doc__ = """
    adaLN block (paper section 3.2): LayerNorm scale and shift regressed from c, no residual gates.
    Extra parameters: adaLN_modulation.1 (D -> 4D), 4·D² + 4·D per block.
    The residual updates run as the gated ops with gate = 1 (x + 1 * y == x + y exactly).
    """ + _FUSED_BLOCK_ARGS
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(),
            nn.Linear(hidden_size, 4 * hidden_size, bias=True)
        )

    def forward(self, x, c, mod=None, h=None, next_norm=None):
        if mod is None:
            mod = self.adaLN_modulation(c)                                           # (N, 4D)
        shift_msa, scale_msa, shift_mlp, scale_mlp = mod.to(x.dtype).chunk(4, dim=1)
        one = x.new_ones(1, x.shape[-1]).expand(x.shape[0], -1)                     # (N, D) gate = 1
        if h is None:
            h = ln_modulate(x, shift_msa, scale_msa, self.norm1.eps)                 # (N, T, D) modulate(norm1(x))
        with nvtx.range("attn"):
            a = self.attn(h).to(x.dtype)                                             # (N, T, D)
        x, h = gated_residual_ln_modulate(x, a, one, shift_mlp, scale_mlp, self.norm2.eps)  # (N, T, D) x2: x + a, norm2
        with nvtx.range("mlp"):
            m = self.mlp(h).to(x.dtype)                                              # (N, T, D)
        if next_norm is None:
            return gated_residual(x, m, one)                                         # (N, T, D) x + m
        return gated_residual_ln_modulate(x, m, one, *next_norm)                     # (N, T, D) x2: x, next norm


class CrossAttentionBlock(nn.Module):
    """
    Cross-attention block (paper section 3.2): a standard pre-LN ViT block with a multi-head
    cross-attention layer after self-attention, attending to the length-two sequence [t, c].
    Extra parameters: norm_cross (2·D) and cross_attn.{q, kv, proj} (4·D² + 4·D) per block.
    """
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x, cond):
        x = x + self.attn(self.norm1(x))                          # (N, T, D)
        x = x + self.cross_attn(self.norm_cross(x), cond)         # (N, T, D); cond: (N, 2, D)
        x = x + self.mlp(self.norm2(x))                           # (N, T, D)
        return x


class InContextBlock(nn.Module):
    """
    In-context block (paper section 3.2): a standard pre-LN ViT block; t and c travel as two
    extra tokens of the sequence. Extra parameters: the LayerNorm affines (4·D per block).
    """
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x, c=None):
        x = x + self.attn(self.norm1(x))  # (N, T + 2, D)
        x = x + self.mlp(self.norm2(x))   # (N, T + 2, D)
        return x


_BLOCKS = {
    "adaLN-Zero": DiTBlock,
    "adaLN": AdaLNBlock,
    "cross-attention": CrossAttentionBlock,
    "in-context": InContextBlock,
}


class FinalLayer(nn.Module):
    """
    The final layer of DiT. With `adaptive=False` (cross-attention and in-context models) the
    LayerNorm has a learned affine instead of the adaLN modulation.
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
        """mod: adaLN_modulation(c) if already computed; h: modulate(norm_final(x), shift, scale) if
        the last block already computed it (fused with its last residual update)."""
        if h is None:
            if self.adaptive:
                if mod is None:
                    mod = self.adaLN_modulation(c)                   # (N, 2D)
                shift, scale = mod.to(x.dtype).chunk(2, dim=1)
                h = ln_modulate(x, shift, scale, self.norm_final.eps)  # (N, T, D)
            else:
                h = self.norm_final(x)                               # (N, T, D)
        return linear(self.linear, h)                                # (N, T, p*p*C_out)


class DiT(nn.Module):
    """
    Diffusion model with a Transformer backbone.
    """
    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        block="adaLN-Zero",
    ):
        super().__init__()
        _check_config(input_size, patch_size, in_channels, hidden_size, depth, num_heads,
                      mlp_ratio, class_dropout_prob, num_classes, block)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.input_size = input_size
        self.num_classes = num_classes
        self.block = block
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           class_dropout_prob=class_dropout_prob, num_classes=num_classes,
                           learn_sigma=learn_sigma, block=block)

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Will use fixed sin-cos embedding:
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)

        block_cls = _BLOCKS[block]
        self.blocks = nn.ModuleList([
            block_cls(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)
        ])
        adaptive = block in ("adaLN-Zero", "adaLN")
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaptive=adaptive)
        self.initialize_weights()
        # The adaLN projections of every block and of the final layer read the same c: one GEMM
        # over their weights stacked in one buffer, of which each layer's weight and bias are views
        # (same parameters and state_dict; nothing cached, so nothing can go stale).
        self._share_adaln_storage()

    # .to() / .double() / .cuda() convert every parameter into its own storage, and deepcopy /
    # unpickling clone each one: re-alias the adaLN weights right away (the forward would
    # otherwise do it at its first call), so that an optimizer or DDP built next sees the layout
    # it trains with.
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._share_adaln_storage()
        return self

    def __setstate__(self, state):
        state.pop("_adaln", None)  # the cached adaLN pack of models pickled by earlier versions
        super().__setstate__(state)
        self._share_adaln_storage()

    def _share_adaln_storage(self):
        linears = self._adaln_linears() if self.block in ("adaLN-Zero", "adaLN") else None
        if linears is not None:
            share_adaln_storage(linears)

    @classmethod
    def from_pretrained(cls, name_or_path, key="ema", **overrides):
        """A DiT with weights from a local checkpoint file or a published checkpoint name
        ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"); see dit_fast.checkpoint.from_pretrained."""
        from ..checkpoint import from_pretrained
        return from_pretrained(name_or_path, key=key, **overrides)

    def initialize_weights(self):
        # Initialize transformer layers:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        # Initialize (and freeze) pos_embed by sin-cos embedding:
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.x_embedder.num_patches ** 0.5))
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Initialize patch_embed like nn.Linear (instead of nn.Conv2d):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Initialize label embedding table:
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

        # Initialize timestep embedding MLP:
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # Zero-out adaLN modulation layers in DiT blocks (adaLN-Zero only: plain adaLN keeps the
        # xavier init, as the paper zero-initializes only the adaLN-Zero regression):
        if self.block == "adaLN-Zero":
            for block in self.blocks:
                nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
                nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero-out output layers:
        if self.final_layer.adaptive:
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """
        x: (N, T, patch_size**2 * C)
        imgs: (N, C, H, W)
        The official reshape + einsum('nhwpqc->nchpwq') + reshape, as one gather (ops.unpatchify).
        """
        return unpatchify_tokens(x, self.x_embedder.patch_size[0], self.out_channels)

    def forward(self, x, t, y):
        """
        Forward pass of DiT.
        x: (N, C, H, W) tensor of spatial inputs (images or latent representations of images)
        t: (N,) tensor of diffusion timesteps
        y: (N,) tensor of class labels
        """
        t = self.check_inputs(x, t, y)
        x, c, T = self.embed(x, t, y)           # (N, T', D) tokens (T' = T + 2 in-context), c
        mods = self.block_modulations(c)        # [(N, 6D or 4D) per block, (N, 2D) final] or None
        x, h = self.run_blocks(x, c, mods, 0, len(self.blocks))  # (N, T', D), final norm or None
        return self.head(x, c, T, mods, h)      # (N, out_channels, H, W)

    # The pieces of forward, a public API: feature caches (dit_fast.sampling.StepCache and the
    # forecasting cache) run them with a cache between block ranges. forward() is exactly
    #   t = check_inputs(x, t, y); x, c, T = embed(x, t, y); mods = block_modulations(c)
    #   x, h = run_blocks(x, c, mods, 0, depth); return head(x, c, T, mods, h)

    def embed(self, x, t, y):
        """Tokens (N, T, D) (+ the t and y tokens in-context), the conditioning c ((N, D); (N, 2, D)
        for cross-attention; None in-context) and the number of image tokens T."""
        with nvtx.range("dit.embed"):
            w = self.x_embedder.proj.weight
            if x.dtype != w.dtype and torch.is_autocast_enabled(x.device.type):
                x = x.to(w.dtype)                # as the official conv under autocast: any input dtype
            # x_embedder(x) + pos_embed as one GEMM + epilogue
            x = patch_embed(x, self.x_embedder.proj.weight, self.x_embedder.proj.bias,
                            self.pos_embed, self.patch_size)  # (N, T, D), where T = H * W / patch_size ** 2
            t = self.t_embedder(t)               # (N, D)
            y = self.y_embedder(y, self.training)  # (N, D)
        T = x.shape[1]
        if self.block == "in-context":
            x = torch.cat([x, t.unsqueeze(1).to(x.dtype), y.unsqueeze(1).to(x.dtype)], dim=1)  # (N, T + 2, D)
            return x, None, T
        if self.block == "cross-attention":
            return x, torch.stack([t, y], dim=1), T  # c: (N, 2, D)
        return x, t + y, T                       # c: (N, D)

    def block_modulations(self, c):
        """adaLN blocks: [adaLN_modulation(c) of each block, then of the final layer], as one GEMM
        for all of them (ops.adaln_projections over the layers as they are now), except under the
        reference backend (eager), which runs the official per-layer Linear(SiLU(c)) so that the
        model stays bit-identical to the official one, and for layers replaced by anything other
        than a plain SiLU + Linear (e.g. a LoRA wrapper), which run as they are. Other blocks:
        None."""
        if self.block not in ("adaLN-Zero", "adaLN"):
            return None
        linears = self._adaln_linears()
        if linears is None or (not torch.compiler.is_compiling()
                               and _backends.requested_backend() == "reference"):
            layers = [b.adaLN_modulation for b in self.blocks] + [self.final_layer.adaLN_modulation]
            return [layer(c) for layer in layers]
        return adaln_projections(c, linears)

    def _adaln_linears(self):
        """The Linear of every adaLN_modulation (blocks, then final layer), looked up now, or None
        if one of them is not the official nn.Sequential(nn.SiLU(), nn.Linear) without hooks."""
        linears = []
        for seq in [b.adaLN_modulation for b in self.blocks] + [self.final_layer.adaLN_modulation]:
            if not (type(seq) is nn.Sequential and len(seq) == 2 and type(seq[0]) is nn.SiLU
                    and type(seq[1]) is nn.Linear):
                return None
            if any(m._forward_hooks or m._forward_pre_hooks for m in (seq, seq[0], seq[1])):
                return None
            linears.append(seq[1])
        return linears

    def run_blocks(self, x, c, mods, start, stop):
        """Blocks [start, stop) -> (x, h). adaLN blocks fuse each block's last residual update with
        the LayerNorm-modulate that follows it (the next block's norm1; after the last block of the
        model, the final layer's norm_final: h); at `stop` < depth the range ends on a plain
        residual (h = None). `mods`: block_modulations(c)."""
        h, D, depth = None, x.shape[-1], len(self.blocks)
        for i in range(start, stop):
            block = self.blocks[i]
            with nvtx.range("dit.block%d", i):
                if mods is None:                 # cross-attention / in-context
                    x = block(x) if c is None else block(x, c)  # (N, T', D)
                elif i + 1 < stop or stop == depth:
                    # the LayerNorm-modulate after this block (next block's norm1, or the final
                    # layer's) is fused with the block's last residual update: its shift and scale
                    # lead its mod
                    nxt = self.blocks[i + 1].norm1 if i + 1 < depth else self.final_layer.norm_final
                    shift, scale = mods[i + 1].to(x.dtype)[:, :2 * D].chunk(2, dim=1)  # (N, D) each
                    x, h = block(x, c, mod=mods[i], h=h, next_norm=(shift, scale, nxt.eps))  # (N, T, D) x2
                else:
                    x, h = block(x, c, mod=mods[i], h=h), None  # (N, T, D)
        return x, h

    def head(self, x, c, T, mods, h=None):
        """Final layer + unpatchify of the first T tokens; h: the fused final norm, if computed."""
        with nvtx.range("dit.final"):
            x = x[:, :T]                         # (N, T, D) (drops the in-context t, y tokens)
            x = self.final_layer(x, c, mod=None if mods is None else mods[-1], h=h)  # (N, T, p*p*C_out)
            return self.unpatchify(x)            # (N, out_channels, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels: Union[int, str] = 3):
        """
        Forward pass of DiT, but also batches the unconditional forward pass for classifier-free guidance.
        The first half of the batch is the conditional half; its inputs are reused for the second.
        guide_channels: 3 (official: guidance on the first three channels only, which reproduces the
        published FIDs) or "all" (every latent channel, the standard classifier-free guidance).
        """
        if x.dim() >= 1 and x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg: x must have an even batch (conditional half + "
                             f"unconditional half), got batch {x.shape[0]}")
        if isinstance(cfg_scale, (int, float)) and not math.isfinite(cfg_scale):
            raise ValueError(f"forward_with_cfg: cfg_scale must be a finite number, got {cfg_scale}")
        if guide_channels == "all":
            guide_channels = self.in_channels
        elif not (isinstance(guide_channels, int) and 0 < guide_channels <= self.in_channels):
            raise ValueError(f"guide_channels must be 'all' or an int in [1, {self.in_channels}], "
                             f"got {guide_channels!r}")
        # https://github.com/openai/glide-text2im/blob/main/notebooks/text2im.ipynb
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        # By default, we only apply classifier-free guidance to three channels, as the official
        # release does. To apply it to all latent channels, pass guide_channels="all".
        eps, rest = model_out[:, :guide_channels], model_out[:, guide_channels:]
        cond_eps, uncond_eps = eps[: len(eps) // 2], eps[len(eps) // 2:]  # (an empty batch stays empty)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

    def check_inputs(self, x, t, y):
        """Validate forward() inputs; returns t as a (N,) tensor (a scalar t is broadcast)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a 4-D tensor (N, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        N, C, H, W = x.shape
        dtype = self.x_embedder.proj.weight.dtype
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"x has dtype {x.dtype} but the model's parameters are {dtype}: cast x "
                             f"(x.to({dtype})) or the model (model.to({x.dtype})), or run under torch.autocast")
        if C != self.in_channels:
            raise ValueError(f"x must have in_channels={self.in_channels} channels, got {C} "
                             f"(x.shape={tuple(x.shape)})")
        if H != self.input_size or W != self.input_size:
            raise ValueError(f"x must be spatially input_size x input_size = {self.input_size}x{self.input_size}, "
                             f"got {H}x{W}")
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(N)
        if t.shape != (N,):
            raise ValueError(f"t must have shape ({N},) (one timestep per sample), got {tuple(t.shape)}")
        if not isinstance(y, torch.Tensor) or y.shape != (N,):
            raise ValueError(f"y must be a tensor of shape ({N},) (one class label per sample), got "
                             f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
        if y.dtype not in (torch.int64, torch.int32):  # what the embedding lookup takes
            raise ValueError(f"y must hold integer class labels of dtype torch.int64 or torch.int32, got {y.dtype}"
                             + ("" if y.dtype.is_floating_point or y.dtype == torch.bool else " (use y.long())"))
        top = self.y_embedder.embedding_table.num_embeddings - 1
        if not _is_tracing() and N > 0 and y.device.type != "cpu":  # no host sync per forward on a GPU
            torch._assert_async(((y >= 0) & (y <= top)).all(), f"y must hold labels in [0, {top}]")
        elif not _is_tracing() and N > 0:
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi > top:
                raise ValueError(f"y must hold labels in [0, {self.num_classes - 1}]"
                                 + (f" or the null class {self.num_classes}" if top == self.num_classes else "")
                                 + f", got values in [{lo}, {hi}]")
        return t


def _check_config(input_size, patch_size, in_channels, hidden_size, depth, num_heads,
                  mlp_ratio, class_dropout_prob, num_classes, block):
    if block not in _BLOCKS:
        raise ValueError(f"block must be one of {BLOCK_TYPES}, got {block!r}")
    for name, value in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                        ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads),
                        ("num_classes", num_classes)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if input_size % patch_size:
        raise ValueError(f"input_size ({input_size}) must be divisible by patch_size ({patch_size})")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if hidden_size % 4:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by 4 (2-D sin-cos position embedding)")
    if not mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
    if not 0 <= class_dropout_prob < 1:
        raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob!r}")


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py

def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False, extra_tokens=0):
    """
    grid_size: int of the grid height and width
    return:
    pos_embed: [grid_size*grid_size, embed_dim] or [1+grid_size*grid_size, embed_dim] (w/ or w/o cls_token)
    """
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0)

    grid = grid.reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token and extra_tokens > 0:
        pos_embed = np.concatenate([np.zeros([extra_tokens, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    assert embed_dim % 2 == 0

    # use half of dimensions to encode grid_h
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)

    emb = np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)
    return emb


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """
    embed_dim: output dimension for each position
    pos: a list of positions to be encoded: size (M,)
    out: (M, D)
    """
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.
    omega = 1. / 10000**omega  # (D/2,)

    pos = pos.reshape(-1)  # (M,)
    out = np.einsum('m,d->md', pos, omega)  # (M, D/2), outer product

    emb_sin = np.sin(out)  # (M, D/2)
    emb_cos = np.cos(out)  # (M, D/2)

    emb = np.concatenate([emb_sin, emb_cos], axis=1)  # (M, D)
    return emb


#################################################################################
#                                   DiT Configs                                  #
#################################################################################

def DiT_XL_2(**kwargs):
    return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)

def DiT_XL_4(**kwargs):
    return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)

def DiT_XL_8(**kwargs):
    return DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)

def DiT_L_2(**kwargs):
    return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)

def DiT_L_4(**kwargs):
    return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)

def DiT_L_8(**kwargs):
    return DiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)

def DiT_B_2(**kwargs):
    return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)

def DiT_B_4(**kwargs):
    return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)

def DiT_B_8(**kwargs):
    return DiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)

def DiT_S_2(**kwargs):
    return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)

def DiT_S_4(**kwargs):
    return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)

def DiT_S_8(**kwargs):
    return DiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)


DiT_models = {
    'DiT-XL/2': DiT_XL_2,  'DiT-XL/4': DiT_XL_4,  'DiT-XL/8': DiT_XL_8,
    'DiT-L/2':  DiT_L_2,   'DiT-L/4':  DiT_L_4,   'DiT-L/8':  DiT_L_8,
    'DiT-B/2':  DiT_B_2,   'DiT-B/4':  DiT_B_4,   'DiT-B/8':  DiT_B_8,
    'DiT-S/2':  DiT_S_2,   'DiT-S/4':  DiT_S_4,   'DiT-S/8':  DiT_S_8,
}

# (depth, hidden_size, patch_size, num_heads) of each named configuration.
_SIZES = {"DiT-XL": (28, 1152, 16), "DiT-L": (24, 1024, 16), "DiT-B": (12, 768, 12), "DiT-S": (12, 384, 6)}
DiT_configs = {
    f"{size}/{p}": dict(depth=depth, hidden_size=hidden, patch_size=p, num_heads=heads)
    for size, (depth, hidden, heads) in _SIZES.items()
    for p in (2, 4, 8)
}
