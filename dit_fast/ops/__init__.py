"""Fused operators with pluggable backends (see dit_fast._backends).

Each op module registers the backends it implements with `dit_fast._backends.register_op` and
exposes a public function plus a pure-PyTorch reference (`*_ref`) used as the ground truth in tests.
"""

from .attention import attention_qkv, attention_ref
from .ln_modulate import ln_modulate, ln_modulate_ref

__all__ = ["attention_qkv", "attention_ref", "ln_modulate", "ln_modulate_ref"]
