"""Exponential moving average of model weights, as the official train.py keeps it.

The official update walks every named parameter, the frozen sin-cos `pos_embed` included; here
parameters that do not train (requires_grad=False) are left alone, so the EMA copy keeps the exact
frozen values instead of re-averaging a constant in floating point every step.
"""
from collections import OrderedDict
from copy import deepcopy

import torch
import torch.nn as nn


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` for the EMA weights (same keys, loads strictly into the model class)."""
    ema = deepcopy(model)
    requires_grad(ema, False)
    return ema.eval()


def requires_grad(model: nn.Module, flag: bool = True) -> None:
    for p in model.parameters():
        p.requires_grad = flag


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """ema = decay * ema + (1 - decay) * model, for every trained parameter of `model`."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay!r}")
    ema_params = OrderedDict(ema_model.named_parameters())
    ema_list, src_list = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen (pos_embed): nothing to average
        if name not in ema_params:
            raise KeyError(f"EMA model has no parameter {name!r}")
        ema_list.append(ema_params[name])
        src_list.append(param.detach())
    if not ema_list:
        return
    if decay == 0.0:
        torch._foreach_copy_(ema_list, src_list)
        return
    torch._foreach_mul_(ema_list, decay)
    torch._foreach_add_(ema_list, src_list, alpha=1.0 - decay)
