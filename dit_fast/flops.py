"""Analytic forward-pass cost of DiT models, in the paper's "Gflops" convention.

Convention (Peebles & Xie, "Scalable Diffusion Models with Transformers"): a "flop" is a
multiply-accumulate (MAC), counted for ONE image and ONE forward pass, in units of 1e9 (see the
authors' answer in facebookresearch/DiT#14: "we use the representation learning literature's
convention of counting flops effectively as MACs"). Hardware FLOPs are twice that:
`true_gflop_per_image` returns them (what `torch.utils.flop_counter.FlopCounterMode` reports).

What is counted, per image, with T = (input_size / patch_size)^2 tokens, D = hidden_size,
M = int(D * mlp_ratio), p = patch_size, C = in_channels, C_out = 2C (learn_sigma) or C, L = depth:

    patch_embed     T * p^2 C * D                          (the stride-p conv)
    t_embed         256 * D + D * D                        (timestep MLP on the 256 frequencies)
    adaLN           L * k D^2, k = 6 (adaLN-Zero) / 4 (adaLN); once per image, not per token
    qkv, attn_proj  L * 3 T' D^2, L * T' D^2
    attn_matmul     L * 2 T'^2 D                           (Q K^T and A V)
    mlp             L * 2 T' D M
    cross_attn      L * (2 T D^2 + 4 D^2 + 4 T D)          (cross-attention block only: q and proj on
                                                            T tokens, kv on the 2 conditioning tokens,
                                                            Q K^T and A V against 2 keys)
    final_adaLN     2 D^2                                  (adaLN blocks only)
    final_linear    T * D * p^2 C_out
    norm            T' * D per LayerNorm (2 per block, 3 for cross-attention, + the final one)

T' = T + 2 for the in-context block (t and y travel as two extra tokens), else T. The label
embedding is a table lookup (0 MACs). Softmax, GELU, SiLU, the modulate/gate multiplies, residual
adds and the sin/cos embeddings are elementwise and not counted.

Which small terms the paper counted was decided by matching Table 4 (12 models at 256x256, plus
DiT-XL/2 at 512x512 = 524.6). Every matmul/conv term above is needed: with the per-token block terms
alone S/8 is 5% low; without the patch-embedding and timestep-MLP terms S/8 is 1.1% low. With all
matmul/conv terms (`count_norms=False`) the maximum deviation is 0.56% (S/8, 0.358 vs 0.36), 8 of
the 12 entries round to the printed value, and XL/2 at 512 gives 524.54. Adding the LayerNorms at
one MAC per normalized element (the `norm` term; `count_norms=True`, the default of `dit_gflops`)
makes 11 of the 12 entries and the 512x512 entry round exactly to the printed digits (B/4 gives
5.5664 vs 5.56); the maximum deviation is then 0.52% (S/8, 0.3581 vs 0.36). That term (~0.03% of
XL/2) is an empirical fit to the printed digits, not something the authors documented.

DiT-L/8: we use 5.01 Gflops, our reading of Table 4. The count gives 5.012, and every other /8
model costs ~0.254x its /4 sibling (5.01 / 19.70 = 0.254); a value of 5.73 would be inconsistent
with the other eleven entries under any per-token cost model.

Conditioning blocks (paper Fig. 5, DiT-XL/2 at 256): in-context 119.4, cross-attention 137.6,
adaLN 118.6, adaLN-Zero 118.6 Gflops; `dit_gflops` gives 119.37, 137.63, 118.56, 118.64.
"""
from typing import Dict, Optional

__all__ = [
    "PAPER_GFLOPS", "PAPER_BLOCK_GFLOPS", "dit_config", "dit_macs", "dit_gflops", "sampling_gflops",
    "true_gflop_per_image",
]

# Table 4 of the paper (256x256 unless noted), Gflops = 1e9 MACs per image per forward.
PAPER_GFLOPS = {
    ("DiT-S/8", 256): 0.36, ("DiT-S/4", 256): 1.41, ("DiT-S/2", 256): 6.06,
    ("DiT-B/8", 256): 1.42, ("DiT-B/4", 256): 5.56, ("DiT-B/2", 256): 23.01,
    ("DiT-L/8", 256): 5.01, ("DiT-L/4", 256): 19.70, ("DiT-L/2", 256): 80.71,
    ("DiT-XL/8", 256): 7.39, ("DiT-XL/4", 256): 29.05, ("DiT-XL/2", 256): 118.64,
    ("DiT-XL/2", 512): 524.6,
}
# Figure 5 of the paper: DiT-XL/2 at 256x256 with each conditioning block.
PAPER_BLOCK_GFLOPS = {"in-context": 119.4, "cross-attention": 137.6, "adaLN": 118.6, "adaLN-Zero": 118.6}

_DEFAULTS = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True,
                 block="adaLN-Zero")
_FREQ_DIM = 256  # TimestepEmbedder.frequency_embedding_size
_BLOCKS = ("adaLN-Zero", "adaLN", "cross-attention", "in-context")


def _named_configs() -> dict:
    from .models.dit import DiT_configs
    return DiT_configs


def _config_of_module(model) -> dict:
    config = getattr(model, "config", None)
    if isinstance(config, dict) and "hidden_size" in config:
        return dict(config)
    # Any module with the official DiT state_dict layout (e.g. the official models.DiT).
    from .checkpoint import infer_config
    # num_heads does not change the MAC count; take the model's own when it has one.
    return infer_config(model.state_dict(), num_heads=getattr(model, "num_heads", None) or 1)


def dit_config(name_or_model, image_size: Optional[int] = None, block: Optional[str] = None,
               **config_overrides) -> dict:
    """The DiT(...) configuration that `name_or_model` denotes.

    name_or_model: a DiT_models name ("DiT-XL/2"; "DiT-XL-2" is accepted too), a config dict, or a
    model instance (its `config`, else inferred from its state_dict). image_size: pixel resolution;
    the latent input_size is image_size // 8 (the SD VAE). None: 256 for names, the model's own for
    models and dicts. block: conditioning block; None keeps the model's (names: "adaLN-Zero").
    config_overrides: DiT(...) arguments, applied last (input_size here wins over image_size).
    """
    if isinstance(name_or_model, str):
        name = name_or_model
        configs = _named_configs()
        if name not in configs and name.replace("-", "/", 2).replace("/", "-", 1) in configs:
            name = name.replace("-", "/", 2).replace("/", "-", 1)   # "DiT-XL-2" -> "DiT-XL/2"
        if name not in configs:
            raise ValueError(f"name_or_model: unknown DiT model {name_or_model!r}; known: {sorted(configs)}")
        config = dict(_DEFAULTS, **configs[name])
        if image_size is None:
            image_size = 256
    elif isinstance(name_or_model, dict):
        config = dict(_DEFAULTS, **name_or_model)
    elif hasattr(name_or_model, "state_dict"):
        config = dict(_DEFAULTS, **_config_of_module(name_or_model))
    else:
        raise ValueError(f"name_or_model must be a model name, a config dict or a DiT model, "
                         f"got {type(name_or_model).__name__}")
    if image_size is not None:
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 (the VAE downsamples by 8), got {image_size}")
        config["input_size"] = image_size // 8
    if block is not None:
        config["block"] = block
    config.update(config_overrides)
    if config["block"] not in _BLOCKS:
        raise ValueError(f"block must be one of {_BLOCKS}, got {config['block']!r}")
    if config["input_size"] % config["patch_size"]:
        raise ValueError(f"input_size ({config['input_size']}) must be divisible by patch_size "
                         f"({config['patch_size']})")
    return config


def dit_macs(name_or_model, image_size: Optional[int] = None, block: Optional[str] = None,
             count_norms: bool = True, **config_overrides) -> Dict[str, int]:
    """Multiply-accumulates of one forward pass for one image, term by term (see the module
    docstring); the "total" entry is their sum. Arguments as in `dit_config`; count_norms=False
    drops the LayerNorm term (leaving exactly the matmul/conv MACs)."""
    c = dit_config(name_or_model, image_size, block, **config_overrides)
    D, L, p, C = c["hidden_size"], c["depth"], c["patch_size"], c["in_channels"]
    M = int(D * c["mlp_ratio"])
    C_out = 2 * C if c["learn_sigma"] else C
    T = (c["input_size"] // p) ** 2
    blk = c["block"]
    Tx = T + 2 if blk == "in-context" else T          # sequence length inside the blocks
    adaptive = blk in ("adaLN-Zero", "adaLN")
    n_norms = 3 if blk == "cross-attention" else 2
    macs = {
        "patch_embed": T * p * p * C * D,
        "t_embed": _FREQ_DIM * D + D * D,
        "adaLN": L * {"adaLN-Zero": 6, "adaLN": 4}.get(blk, 0) * D * D,
        "qkv": L * 3 * Tx * D * D,
        "attn_proj": L * Tx * D * D,
        "attn_matmul": L * 2 * Tx * Tx * D,
        "cross_attn": L * (2 * T * D * D + 2 * 2 * D * D + 2 * T * 2 * D) if blk == "cross-attention" else 0,
        "mlp": L * 2 * Tx * D * M,
        "final_adaLN": 2 * D * D if adaptive else 0,
        "final_linear": T * D * p * p * C_out,
        "norm": (L * n_norms * Tx * D + T * D) if count_norms else 0,
    }
    macs["total"] = sum(macs.values())
    return macs


def dit_gflops(name_or_model, image_size: Optional[int] = None, block: Optional[str] = None,
               count_norms: bool = True, **config_overrides) -> float:
    """Gflops in the paper's convention (1e9 MACs, one image, one forward pass).

    dit_gflops("DiT-XL/2") -> 118.64; dit_gflops("DiT-XL/2", 512) -> 524.6;
    dit_gflops("DiT-XL/2", block="cross-attention") -> 137.6. A model instance is read from its
    config (image_size=None keeps its resolution)."""
    return dit_macs(name_or_model, image_size, block, count_norms, **config_overrides)["total"] / 1e9


def sampling_gflops(name_or_model, steps: int, image_size: Optional[int] = None, cfg: bool = True,
                    block: Optional[str] = None, count_norms: bool = True, **config_overrides) -> float:
    """Gflops (paper convention) to sample one image: dit_gflops x steps x (2 with classifier-free
    guidance, whose forward_with_cfg runs the conditional and the unconditional half)."""
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    per_forward = dit_gflops(name_or_model, image_size, block, count_norms, **config_overrides)
    return per_forward * steps * (2 if cfg else 1)


def true_gflop_per_image(name_or_model, image_size: Optional[int] = None, block: Optional[str] = None,
                         count_norms: bool = False, **config_overrides) -> float:
    """Hardware GFLOP (1e9 floating-point operations, a MAC = 2) of one forward pass for one image,
    for throughput/MFU numbers. By default only the matmul/conv work is counted, which is exactly
    what torch.utils.flop_counter.FlopCounterMode reports for a forward (with attention on a path
    it counts); count_norms=True adds the LayerNorm term."""
    return 2 * dit_macs(name_or_model, image_size, block, count_norms, **config_overrides)["total"] / 1e9
