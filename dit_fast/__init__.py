"""dit_fast: fast, faithful Diffusion Transformers (DiT, Peebles & Xie 2022)."""
from ._backends import backends, use_backend
from .checkpoint import from_pretrained, infer_config, load_checkpoint, save_checkpoint
from .models import BLOCK_TYPES, DiT, DiT_models

__version__ = "0.1.0"
__all__ = ["BLOCK_TYPES", "DiT", "DiT_models", "backends", "from_pretrained", "infer_config", "load_checkpoint",
           "save_checkpoint", "use_backend"]
