from .dit import BLOCK_TYPES, DiT, DiT_configs, DiT_models, get_2d_sincos_pos_embed

__all__ = ["BLOCK_TYPES", "DiT", "DiT_configs", "DiT_models", "get_2d_sincos_pos_embed"]
