"""Fused operators with pluggable backends (see dit_fast._backends).

Each op module registers the backends it implements with `dit_fast._backends.register_op` and
exposes a public function plus a pure-PyTorch reference (`*_ref`) used as the ground truth in tests.
"""

from .gated_residual import (gated_residual, gated_residual_ln_modulate,
                             gated_residual_ln_modulate_ref, gated_residual_ref)
from .gelu import gelu_bias, gelu_bias_ref, linear_gelu, linear_gelu_ref
from .ln_modulate import ln_modulate, ln_modulate_ref

__all__ = ["gated_residual", "gated_residual_ln_modulate", "gated_residual_ln_modulate_ref",
           "gated_residual_ref", "gelu_bias", "gelu_bias_ref", "linear_gelu", "linear_gelu_ref",
           "ln_modulate", "ln_modulate_ref"]
