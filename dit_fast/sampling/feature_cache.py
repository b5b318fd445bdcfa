"""The base of DiT's feature caches (StepCache, TaylorCache): a module that samplers use in place of
the model it wraps (its weights are shared, not copied)."""
from __future__ import annotations

from typing import Union

import torch.nn as nn

from ..models.dit import DiT


class FeatureCache(nn.Module):
    """Wraps `model`; subclasses implement `forward(x, t, y)` with their cache between the model's
    public pieces (DiT.embed / block_modulations / run_blocks / head)."""

    def __init__(self, model: DiT) -> None:
        super().__init__()
        if not isinstance(model, DiT):
            raise ValueError(f"model must be a dit_fast DiT, got {type(model).__name__}")
        self.model = model

    # attributes DiT.forward_with_cfg and samplers read
    @property
    def in_channels(self) -> int:
        return self.model.in_channels

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def config(self) -> dict:
        return self.model.config

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels: Union[int, str] = 3):
        """DiT.forward_with_cfg through the cache (the conditional and null halves share one
        decision per step)."""
        return DiT.forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=guide_channels)
