"""Convert DiT weights between the official / dit_fast layout and diffusers' `DiTTransformer2DModel`.

    sd_hf, cfg_hf = to_diffusers(model.state_dict(), model.config)
    sd, cfg = from_diffusers(sd_hf, cfg_hf)            # == (model.state_dict(), model.config), exactly
    hf_model = to_diffusers_model(model)               # a diffusers.DiTTransformer2DModel
    model = from_diffusers_model(hf_model)             # a dit_fast.models.DiT

Only adaLN-Zero models convert (diffusers implements no other DiT block), with mlp_ratio 4 (diffusers'
FeedForward has a fixed 4x width).

Key mapping (official -> diffusers), as in diffusers' scripts/convert_dit_to_diffusers.py:

    x_embedder.proj.*                 -> pos_embed.proj.*
    pos_embed (frozen sin-cos)        -> (dropped: diffusers recomputes it as a non-persistent buffer)
    t_embedder.mlp.{0,2}.*            -> transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_{1,2}.*
    y_embedder.embedding_table.weight -> transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight
                                         (both copied into EVERY block)
    blocks.i.adaLN_modulation.1.*     -> transformer_blocks.i.norm1.linear.*     (same 6-way chunk order)
    blocks.i.attn.qkv.*               -> transformer_blocks.i.attn1.to_{q,k,v}.*  (rows split in thirds)
    blocks.i.attn.proj.*              -> transformer_blocks.i.attn1.to_out.0.*
    blocks.i.mlp.fc1.* / fc2.*        -> transformer_blocks.i.ff.net.0.proj.* / ff.net.2.*
    final_layer.adaLN_modulation.1.*  -> proj_out_1.*   (conditioned on block 0's embedding copy)
    final_layer.linear.*              -> proj_out_2.*

from_diffusers takes the embedders from block 0 and raises ValueError if another block's copy
differs (possible after training in diffusers: the copies then receive separate gradient updates, a
model the official layout cannot represent).

Numerical differences between diffusers' DiT (0.42.1) and the official DiT. Measured in float32 on
CPU (torch 2.13) with (a) a random DiT (hidden 64, depth 2, 8x8 latents; adaLN and final layers
perturbed so the output is O(1): std 2.45, max |out| ~9) and (b) the official code's own tiny model
and output in tests/data/golden_A.pt (max |out| 1.43); see tests/test_interop_diffusers.py.

1. Timestep frequencies: a real difference that no weight conversion can remove. diffusers'
   `CombinedTimestepLabelEmbeddings` hard-codes `Timesteps(256, flip_sin_to_cos=True,
   downscale_freq_shift=1)`, i.e. frequencies exp(-ln(1e4) * i / 127), i < 128, where the official
   `TimestepEmbedder` uses exp(-ln(1e4) * i / 128). flip_sin_to_cos=True does give the official
   [cos, sin] order, so both embeddings agree exactly at t = 0 (and for i = 0) and drift apart with
   i * t: over t in 0..999 the 256 frequency features differ by up to 1.98 in absolute value (cos/sin
   out of phase), so a converted checkpoint's time MLP sees shifted inputs. Measured output
   differences, stock diffusers vs official: (a) 0 at t = 0, 3.7e-4 at t = 1, 0.125 at t = 250,
   0.306 at t = 999 (max abs); (b) 6.5e-3 max abs over t in {81, ..., 803}. The size depends on the
   weights (the random models' time MLPs are small, std 0.02; a trained model's are not), so treat
   stock diffusers outputs of a converted checkpoint as approximate.
   `match_official_timestep_embedding(model)` sets `downscale_freq_shift = 0` on every block's
   `time_proj` (a runtime attribute, not saved in the diffusers config); afterwards the outputs
   agree to rounding (4).
2. Pre-MLP LayerNorm eps. diffusers' `norm3` uses the config's `norm_eps`, default 1e-5, which the
   published hub configs (facebook/DiT-XL-2-*) leave at the default; the official model uses 1e-6
   for every LayerNorm (diffusers hard-codes 1e-6 for norm1 and norm_out). `to_diffusers` writes
   norm_eps=1e-6, so a converted model matches. With 1e-5 instead, (a) changes by 1.1e-5 max abs.
3. Position embedding. diffusers recomputes the 2-D sin-cos table in torch float64 and casts to
   float32; the official code computes it in numpy float64. Measured: bit-identical (max abs 0.0) for
   (hidden, grid) = (1152, 32), (1152, 64), (384, 4), (64, 4). diffusers does not store the table, so
   `to_diffusers` raises ValueError if a state dict's pos_embed is not it, and `from_diffusers`
   regenerates it with the official code.
4. Attention/matmul grouping. diffusers projects q, k, v with three Linear layers where the official
   model runs one fused qkv Linear; both use F.scaled_dot_product_attention (scale head_dim ** -0.5),
   GELU(tanh) and SiLU. Same dot products, at most a different summation order: measured max abs
   0.0 (bit-identical) in (a) and (b) once 1 is fixed; the tests bound it by 1e-5 * max(1, max|out|).
5. Learned-sigma output layout: identical. out_channels = 2 * in_channels, the first in_channels
   channels are eps and the rest the variance interpolation, unpatchified in the same
   'nhwpqc->nchpwq' order; the final adaLN chunk order (shift, scale) and the block chunk order
   (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) are the same.
6. Label table. diffusers' `LabelEmbedding` always has num_classes + 1 rows (its dropout_prob is
   hard-coded 0.1); the null class is index num_classes in both. A DiT built with
   class_dropout_prob=0 (num_classes rows) gets a zero null row appended by `to_diffusers`; pass
   class_dropout_prob=0 to `from_diffusers` to drop it again.
7. Inputs and pipeline. diffusers asserts a 1-D `timestep` tensor (no scalar broadcast) and does
   not validate labels. Its `DiTPipeline` (outside this module) guides all latent channels and
   discards the learned variance; the official `sample.py` guides the first 3 channels and uses it.
"""
from typing import Dict, Optional, Tuple

import torch

__all__ = [
    "to_diffusers", "from_diffusers", "to_diffusers_model", "from_diffusers_model",
    "match_official_timestep_embedding",
]

_DIT_DEFAULTS = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                     mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True,
                     block="adaLN-Zero")
_OFFICIAL_EPS = 1e-6


def _canonical_pos_embed(hidden_size: int, grid_size: int) -> torch.Tensor:
    from ..models.dit import get_2d_sincos_pos_embed
    return torch.from_numpy(get_2d_sincos_pos_embed(hidden_size, grid_size)).float().unsqueeze(0)


def _dit_config(state_dict, config) -> dict:
    if config is None:
        from ..checkpoint import infer_config
        config = infer_config(state_dict)
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict of DiT(...) arguments, got {type(config).__name__}")
    config = dict(_DIT_DEFAULTS, **config)
    if config["block"] != "adaLN-Zero":
        raise ValueError(f"block: only adaLN-Zero DiTs convert to diffusers' DiTTransformer2DModel, "
                         f"got block={config['block']!r}")
    D = config["hidden_size"]
    if int(D * config["mlp_ratio"]) != 4 * D:
        raise ValueError(f"mlp_ratio: diffusers' DiT has a fixed MLP width of 4 x hidden_size, got "
                         f"mlp_ratio={config['mlp_ratio']!r}")
    if D % config["num_heads"]:
        raise ValueError(f"num_heads ({config['num_heads']}) must divide hidden_size ({D})")
    return config


def to_diffusers(state_dict: Dict[str, torch.Tensor], config: Optional[dict] = None
                 ) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Official/dit_fast DiT state dict -> (DiTTransformer2DModel state dict, its config dict).

    config: the DiT(...) arguments (`model.config`); None infers them from the state dict (num_heads
    from the named configuration with the same hidden size). Raises ValueError for non-adaLN-Zero
    blocks (argument `block`), an MLP ratio other than 4, missing/unexpected keys, or a pos_embed
    that is not the fixed sin-cos table. The returned tensors are fresh copies.
    """
    config = _dit_config(state_dict, config)
    sd = {k: v for k, v in state_dict.items()}
    for prefix in ("module.", "_orig_mod."):
        sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    D, depth, p = config["hidden_size"], config["depth"], config["patch_size"]
    grid = config["input_size"] // p

    def take(key):
        try:
            return sd.pop(key)
        except KeyError:
            raise ValueError(f"state_dict: missing key {key!r} for a depth-{depth} adaLN-Zero DiT") from None

    pos = take("pos_embed")
    canonical = _canonical_pos_embed(D, grid)
    if pos.shape != canonical.shape or not torch.allclose(
            pos.float().cpu(), canonical.to(pos.dtype).float(), rtol=0, atol=1e-6):
        raise ValueError("state_dict: pos_embed is not the fixed 2-D sin-cos table, which diffusers "
                         "recomputes and cannot store")
    out = {
        "pos_embed.proj.weight": take("x_embedder.proj.weight"),
        "pos_embed.proj.bias": take("x_embedder.proj.bias"),
    }
    t_emb = {
        "timestep_embedder.linear_1.weight": take("t_embedder.mlp.0.weight"),
        "timestep_embedder.linear_1.bias": take("t_embedder.mlp.0.bias"),
        "timestep_embedder.linear_2.weight": take("t_embedder.mlp.2.weight"),
        "timestep_embedder.linear_2.bias": take("t_embedder.mlp.2.bias"),
    }
    table = take("y_embedder.embedding_table.weight")
    if table.shape[0] == config["num_classes"]:         # class_dropout_prob=0: no null-class row
        table = torch.cat([table, table.new_zeros(1, table.shape[1])], dim=0)
    elif table.shape[0] != config["num_classes"] + 1:
        raise ValueError(f"state_dict: label table has {table.shape[0]} rows for num_classes="
                         f"{config['num_classes']}")
    t_emb["class_embedder.embedding_table.weight"] = table
    for i in range(depth):
        b, h = f"blocks.{i}.", f"transformer_blocks.{i}."
        for k, v in t_emb.items():
            out[h + "norm1.emb." + k] = v
        out[h + "norm1.linear.weight"] = take(b + "adaLN_modulation.1.weight")
        out[h + "norm1.linear.bias"] = take(b + "adaLN_modulation.1.bias")
        for kind in ("weight", "bias"):
            q, k, v = take(b + f"attn.qkv.{kind}").chunk(3, dim=0)
            out[h + f"attn1.to_q.{kind}"], out[h + f"attn1.to_k.{kind}"], out[h + f"attn1.to_v.{kind}"] = q, k, v
            out[h + f"attn1.to_out.0.{kind}"] = take(b + f"attn.proj.{kind}")
            out[h + f"ff.net.0.proj.{kind}"] = take(b + f"mlp.fc1.{kind}")
            out[h + f"ff.net.2.{kind}"] = take(b + f"mlp.fc2.{kind}")
    for kind in ("weight", "bias"):
        out[f"proj_out_1.{kind}"] = take(f"final_layer.adaLN_modulation.1.{kind}")
        out[f"proj_out_2.{kind}"] = take(f"final_layer.linear.{kind}")
    if sd:
        raise ValueError(f"state_dict: unexpected keys for a depth-{depth} adaLN-Zero DiT: {sorted(sd)[:8]}")
    out = {k: v.detach().clone().contiguous() for k, v in out.items()}

    in_ch = config["in_channels"]
    hf_config = dict(
        num_attention_heads=config["num_heads"], attention_head_dim=D // config["num_heads"],
        in_channels=in_ch, out_channels=2 * in_ch if config["learn_sigma"] else in_ch,
        num_layers=depth, dropout=0.0, norm_num_groups=32, attention_bias=True,
        sample_size=config["input_size"], patch_size=p, activation_fn="gelu-approximate",
        num_embeds_ada_norm=config["num_classes"], upcast_attention=False, norm_type="ada_norm_zero",
        norm_elementwise_affine=False, norm_eps=_OFFICIAL_EPS,
    )
    return out, hf_config


def from_diffusers(diffusers_state_dict: Dict[str, torch.Tensor], diffusers_config: dict,
                   class_dropout_prob: float = 0.1) -> Tuple[Dict[str, torch.Tensor], dict]:
    """DiTTransformer2DModel state dict and config -> (official/dit_fast state dict, DiT(...) config).

    class_dropout_prob: the DiT's label-dropout probability (not stored by diffusers, which always
    keeps a null-class row); 0 drops that row. Raises ValueError for configurations the official
    model cannot express (norm_type other than ada_norm_zero, an activation other than
    gelu-approximate, no attention bias, affine norms, a non-4x MLP) and when the per-block copies of
    the timestep/label embedders differ. The config's norm_eps is not carried over: the official
    model uses 1e-6 (see the module docstring, point 2).
    """
    cfg = dict(diffusers_config)
    checks = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
              "norm_elementwise_affine": False}
    for key, want in checks.items():
        if cfg.get(key, want) != want:
            raise ValueError(f"diffusers_config: {key}={cfg[key]!r} has no official DiT equivalent "
                             f"(expected {want!r})")
    heads = cfg.get("num_attention_heads", 16)
    D = heads * cfg.get("attention_head_dim", 72)
    depth = cfg.get("num_layers", 28)
    in_ch = cfg.get("in_channels", 4)
    out_ch = cfg.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"diffusers_config: out_channels={out_ch} must be in_channels ({in_ch}) or twice it")
    num_classes = cfg.get("num_embeds_ada_norm", 1000)
    p = cfg.get("patch_size", 2)
    input_size = cfg.get("sample_size", 32)
    if not 0 <= class_dropout_prob < 1:
        raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob!r}")

    sd = dict(diffusers_state_dict)
    sd.pop("pos_embed.pos_embed", None)   # only persistent with pos_embed_max_size (not DiT)

    def take(key):
        try:
            return sd.pop(key)
        except KeyError:
            raise ValueError(f"diffusers_state_dict: missing key {key!r} for num_layers={depth}") from None

    emb_keys = ["timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias",
                "timestep_embedder.linear_2.weight", "timestep_embedder.linear_2.bias",
                "class_embedder.embedding_table.weight"]
    emb = {k: take("transformer_blocks.0.norm1.emb." + k) for k in emb_keys}
    for i in range(1, depth):
        for k in emb_keys:
            other = take(f"transformer_blocks.{i}.norm1.emb.{k}")
            if other.shape != emb[k].shape or not torch.equal(other, emb[k]):
                raise ValueError(f"diffusers_state_dict: transformer_blocks.{i}.norm1.emb.{k} differs from "
                                 f"block 0's copy; the official DiT has one shared timestep/label embedder")
    table = emb["class_embedder.embedding_table.weight"]
    if table.shape[0] != num_classes + 1:
        raise ValueError(f"diffusers_state_dict: label table has {table.shape[0]} rows, expected "
                         f"num_embeds_ada_norm + 1 = {num_classes + 1}")
    if class_dropout_prob == 0:
        table = table[:num_classes]

    out = {
        "x_embedder.proj.weight": take("pos_embed.proj.weight"),
        "x_embedder.proj.bias": take("pos_embed.proj.bias"),
        "t_embedder.mlp.0.weight": emb["timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": emb["timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": emb["timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": emb["timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": table,
    }
    w = out["x_embedder.proj.weight"]
    out = {"pos_embed": _canonical_pos_embed(D, input_size // p).to(dtype=w.dtype, device=w.device), **out}
    mlp_hidden = None
    for i in range(depth):
        b, h = f"blocks.{i}.", f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            out[b + f"attn.qkv.{kind}"] = torch.cat([take(h + f"attn1.to_{n}.{kind}") for n in "qkv"], dim=0)
            out[b + f"attn.proj.{kind}"] = take(h + f"attn1.to_out.0.{kind}")
        out[b + "mlp.fc1.weight"] = take(h + "ff.net.0.proj.weight")
        out[b + "mlp.fc1.bias"] = take(h + "ff.net.0.proj.bias")
        out[b + "mlp.fc2.weight"] = take(h + "ff.net.2.weight")
        out[b + "mlp.fc2.bias"] = take(h + "ff.net.2.bias")
        out[b + "adaLN_modulation.1.weight"] = take(h + "norm1.linear.weight")
        out[b + "adaLN_modulation.1.bias"] = take(h + "norm1.linear.bias")
        mlp_hidden = out[b + "mlp.fc1.weight"].shape[0]
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = take(f"proj_out_1.{kind}")
        out[f"final_layer.linear.{kind}"] = take(f"proj_out_2.{kind}")
    if sd:
        raise ValueError(f"diffusers_state_dict: unexpected keys: {sorted(sd)[:8]}")
    if mlp_hidden is not None and mlp_hidden != 4 * D:
        raise ValueError(f"diffusers_state_dict: MLP width {mlp_hidden} != 4 x hidden ({4 * D})")
    out = {k: v.detach().clone().contiguous() for k, v in out.items()}

    config = dict(input_size=input_size, patch_size=p, in_channels=in_ch, hidden_size=D, depth=depth,
                  num_heads=heads, mlp_ratio=4.0, class_dropout_prob=class_dropout_prob,
                  num_classes=num_classes, learn_sigma=out_ch == 2 * in_ch, block="adaLN-Zero")
    return out, config


def match_official_timestep_embedding(model):
    """Make a diffusers DiTTransformer2DModel embed timesteps with the official frequencies
    (downscale_freq_shift 1 -> 0 on every block's time_proj; see the module docstring, point 1).
    Modifies and returns `model`; the change is not saved by save_pretrained."""
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model


def to_diffusers_model(dit_model, official_timestep_embedding: bool = False):
    """A diffusers DiTTransformer2DModel with `dit_model`'s weights (same dtype and device, same
    train/eval mode). official_timestep_embedding=True applies match_official_timestep_embedding."""
    from diffusers import DiTTransformer2DModel

    config = getattr(dit_model, "config", None)
    sd_hf, cfg_hf = to_diffusers(dit_model.state_dict(), config if isinstance(config, dict) else None)
    param = next(dit_model.parameters())
    model = DiTTransformer2DModel(**cfg_hf)
    model.load_state_dict(sd_hf, strict=True)
    if param.dtype != torch.float32:
        # diffusers logs a warning about `.to(dtype)` casting with no float32-pinned modules to keep
        # (its list is empty for this model); silence it for this call only.
        from diffusers.utils import logging as hf_logging
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = model.to(dtype=param.dtype)
        finally:
            hf_logging.set_verbosity(verbosity)
    model = model.to(device=param.device)
    model.train(dit_model.training)
    if official_timestep_embedding:
        match_official_timestep_embedding(model)
    return model


def from_diffusers_model(model, class_dropout_prob: float = 0.1):
    """A dit_fast DiT with the weights of a diffusers DiTTransformer2DModel (same dtype, device and
    train/eval mode)."""
    from ..models.dit import DiT

    sd, config = from_diffusers(model.state_dict(), dict(model.config), class_dropout_prob=class_dropout_prob)
    param = next(model.parameters())
    dit = DiT(**config)
    dit.load_state_dict(sd, strict=True)
    dit = dit.to(device=param.device, dtype=param.dtype)
    dit.train(model.training)
    return dit
