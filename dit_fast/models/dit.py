# DiT (facebookresearch/DiT, models.py) on dit_fast's fused ops: same constructor arguments,
# state_dict keys and outputs (bit-identical to the official model in float32 under
# dit_fast.use_backend("reference")). Layers: layers.py; blocks and final layer: blocks.py.
# References:
# GLIDE: https://github.com/openai/glide-text2im
# MAE: https://github.com/facebookresearch/mae/blob/main/models_mae.py

import math
from typing import Union

import numpy as np
import torch
import torch.nn as nn

from .. import _backends, nvtx
from ..ops import patch_embed
from ..ops import unpatchify as unpatchify_tokens
from ..ops.adaln import adaln_projections, share_adaln_storage
from .blocks import BLOCK_TYPES, BLOCKS, FinalLayer
from .layers import LabelEmbedder, PatchEmbed, TimestepEmbedder
# Re-exported: users import every layer from here, as from the official models.py.
from .blocks import AdaLNBlock, BlockOutput, CrossAttentionBlock, DiTBlock, InContextBlock  # noqa: F401
from .layers import Attention, CrossAttention, Mlp  # noqa: F401

_ADALN = ("adaLN-Zero", "adaLN")  # the blocks conditioned through adaLN_modulation(c)


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
#                                 Core DiT Model                                #
#################################################################################

class DiT(nn.Module):
    """
    Diffusion model with a Transformer backbone.

    Beyond the official constructor: `block` picks one of the paper's four conditioning blocks
    (BLOCK_TYPES; "adaLN-Zero" is the official layout), inputs are validated (ValueError naming the
    argument), and bfloat16 works.

    Fused pieces (a public API). forward() is exactly the five calls below; feature caches
    (dit_fast.sampling.StepCache, the forecasting cache) run them with a cache between block ranges.
    N batch, T = (input_size / patch_size)**2 image tokens, T' = T (T + 2 for "in-context"), D hidden:

        t = check_inputs(x, t, y)                    t: (N,) (a scalar t is broadcast)
        x, c, T = embed(x, t, y)                     x: (N, T', D) tokens; c: (N, D) conditioning,
                                                     (N, 2, D) cross-attention, None in-context
        mods = block_modulations(c)                  adaLN: [adaLN_modulation(c) of each block (N, 6D)
                                                     or (N, 4D), then of the final layer (N, 2D)]; else None
        x, h = run_blocks(x, c, mods, start, stop)   blocks [start, stop): x (N, T', D); h (N, T, D), the
                                                     final layer's input norm when stop == depth (adaLN), else None
        out = head(x, c, T, mods, h)                 final layer + unpatchify: (N, out_channels, H, W)

    Under the default backend the adaLN projections of all blocks and of the final layer run as one
    GEMM, and each block's last residual update is fused with the next LayerNorm-modulate (see
    DiTBlock); README "The fused forward pass" maps every fused op to the official expression.
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

        self.blocks = nn.ModuleList([
            BLOCKS[block](hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaptive=block in _ADALN)
        self.initialize_weights()
        self._share_adaln_storage()

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
        t = self.check_inputs(x, t, y)                            # (N,)
        x, c, T = self.embed(x, t, y)                             # (N, T', D), c, T
        mods = self.block_modulations(c)                          # [(N, 6D or 4D) per block, (N, 2D)] or None
        x, h = self.run_blocks(x, c, mods, 0, len(self.blocks))   # (N, T', D), (N, T', D) final norm or None
        return self.head(x, c, T, mods, h)                        # (N, out_channels, H, W)

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

    # ---- the fused pieces of forward (public API, see the class docstring) -----------------------

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
        if self.block not in _ADALN:
            return None
        linears = self._adaln_linears()
        if linears is None or (not torch.compiler.is_compiling()
                               and _backends.requested_backend() == "reference"):
            layers = [b.adaLN_modulation for b in self.blocks] + [self.final_layer.adaLN_modulation]
            return [layer(c) for layer in layers]
        return adaln_projections(c, linears)

    def run_blocks(self, x, c, mods, start, stop):
        """Blocks [start, stop) -> (x, h). adaLN blocks fuse each block's last residual update with
        the LayerNorm-modulate that follows it (the next block's norm1; after the model's last block,
        the final layer's norm_final, returned as h); a range ending before the last block ends on a
        plain residual (h = None). `mods`: block_modulations(c)."""
        h = None
        for i in range(start, stop):
            block = self.blocks[i]
            with nvtx.range("dit.block%d", i):
                if mods is None:                 # cross-attention / in-context: nothing to fuse
                    x, h = block(x, c)                                                # (N, T', D), None
                else:
                    fuse = i + 1 < stop or stop == len(self.blocks)
                    x, h = block(x, c, mod=mods[i], h=h,
                                 next_norm=self._next_norm(mods, i, x) if fuse else None)  # (N, T, D) x2
        return x, h

    def _next_norm(self, mods, i, x):
        """(shift, scale, eps) of the LayerNorm-modulate after block i: the next block's norm1 or the
        final layer's norm_final. Their shift and scale lead the next layer's modulation."""
        D = x.shape[-1]
        norm = self.blocks[i + 1].norm1 if i + 1 < len(self.blocks) else self.final_layer.norm_final
        shift, scale = mods[i + 1].to(x.dtype)[:, :2 * D].chunk(2, dim=1)            # (N, D) each
        return shift, scale, norm.eps

    def head(self, x, c, T, mods, h=None):
        """Final layer + unpatchify of the first T tokens; h: the fused final norm, if computed."""
        with nvtx.range("dit.final"):
            x = x[:, :T]                         # (N, T, D) (drops the in-context t, y tokens)
            x = self.final_layer(x, c, mod=None if mods is None else mods[-1], h=h)  # (N, T, p*p*C_out)
            return self.unpatchify(x)            # (N, out_channels, H, W)

    # ---- adaLN weights as views of one stacked buffer ---------------------------------------------
    # The adaLN projections of every block and of the final layer read the same c: one GEMM over
    # their weights stacked in one buffer, of which each layer's weight and bias are views (same
    # parameters and state_dict; nothing cached, so nothing can go stale).

    def _share_adaln_storage(self):
        linears = self._adaln_linears() if self.block in _ADALN else None
        if linears is not None:
            share_adaln_storage(linears)

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

    # .to() / .double() / .cuda() convert every parameter into its own storage, and deepcopy /
    # unpickling clone each one: re-alias the adaLN weights right away (the forward would
    # otherwise do it at its first call), so that an optimizer or DDP built next sees the layout
    # it trains with.
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._share_adaln_storage()
        return self

    def __setstate__(self, state):
        super().__setstate__(state)
        self._share_adaln_storage()


def _check_config(input_size, patch_size, in_channels, hidden_size, depth, num_heads,
                  mlp_ratio, class_dropout_prob, num_classes, block):
    if block not in BLOCKS:
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

# The paper's model sizes (Table 1): size -> (depth, hidden_size, num_heads), each with patch size
# 2, 4 or 8. The 12 configurations, their factories and DiT_models all come from this table.
_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
DiT_configs = {
    f"DiT-{size}/{p}": dict(depth=depth, hidden_size=hidden, patch_size=p, num_heads=heads)
    for size, (depth, hidden, heads) in _SIZES.items()
    for p in (2, 4, 8)
}


def _factory(name):
    """DiT_XL_2 & co.: DiT(**DiT_configs[name], **kwargs), as the official factory functions."""
    def factory(**kwargs):
        return DiT(**DiT_configs[name], **kwargs)
    factory.__name__ = factory.__qualname__ = name.replace("-", "_").replace("/", "_")
    factory.__doc__ = f"{name}: DiT({', '.join(f'{k}={v}' for k, v in DiT_configs[name].items())}, **kwargs)"
    return factory


DiT_models = {name: _factory(name) for name in DiT_configs}
DiT_XL_2, DiT_XL_4, DiT_XL_8 = (DiT_models[f"DiT-XL/{p}"] for p in (2, 4, 8))
DiT_L_2, DiT_L_4, DiT_L_8 = (DiT_models[f"DiT-L/{p}"] for p in (2, 4, 8))
DiT_B_2, DiT_B_4, DiT_B_8 = (DiT_models[f"DiT-B/{p}"] for p in (2, 4, 8))
DiT_S_2, DiT_S_4, DiT_S_8 = (DiT_models[f"DiT-S/{p}"] for p in (2, 4, 8))
