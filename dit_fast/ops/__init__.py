"""Fused operators with pluggable backends (see dit_fast._backends).

Each op module registers the backends it implements with `dit_fast._backends.register_op` and
exposes a public function plus a pure-PyTorch reference (`*_ref`) used as the ground truth in tests.
"""

from .adaln import AdaLNPack, adaln_modulation, adaln_modulation_ref, timestep_embedding, timestep_embedding_ref
from .attention import attention_qkv, attention_ref
from .forecast import taylor_forecast, taylor_forecast_ref, taylor_weights
from .gated_residual import (gated_residual, gated_residual_ln_modulate,
                             gated_residual_ln_modulate_ref, gated_residual_ref)
from .gelu import gelu_bias, gelu_bias_ref, linear_gelu, linear_gelu_ref
from .linear import cpu_linear, linear_ref
from .ln_modulate import ln_modulate, ln_modulate_ref
from .patchify import patch_embed, patch_embed_ref, unpatchify, unpatchify_ref
from .sampler_step import ddim_step, ddim_step_ref, ddpm_step, ddpm_step_ref

__all__ = ["attention_qkv", "attention_ref", "ln_modulate", "ln_modulate_ref",
           "gated_residual", "gated_residual_ref", "gated_residual_ln_modulate",
           "gated_residual_ln_modulate_ref", "gelu_bias", "gelu_bias_ref", "linear_gelu",
           "linear_gelu_ref", "cpu_linear", "linear_ref", "patch_embed", "patch_embed_ref", "unpatchify", "unpatchify_ref",
           "AdaLNPack", "adaln_modulation", "adaln_modulation_ref",
           "timestep_embedding", "timestep_embedding_ref",
           "ddpm_step", "ddpm_step_ref", "ddim_step", "ddim_step_ref",
           "taylor_forecast", "taylor_forecast_ref", "taylor_weights"]
