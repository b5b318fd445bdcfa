"""Forecasting feature cache for DiT sampling (TaylorSeer, Liu et al. 2025, "From Reusing to
Forecasting: Accelerating Diffusion Models with TaylorSeers").

`TaylorCache` wraps a DiT and runs the full model only at some sampling steps. At a full step it
caches features and their finite differences across full steps (per sampling step),

    F_0 = feature,   F_{i+1} = (F_i - F_i^prev) / h     (h: steps between the two full steps),

and at the steps in between it forecasts each feature by the Taylor expansion in the step index,

    feature(s + k) ~= sum_{i <= order} F_i k^i / i!      (dit_fast.ops.taylor_forecast, in place),

which costs an element-wise pass instead of the transformer blocks. Which features:

- ``"final"``: the residual stream after the last block. A forecast step runs the embeddings, the
  final layer's adaLN modulation and the final layer only (the cheapest forecast step).
- ``"output"``: the model output, forecast as the data prediction x0 = (x - sqrt(1 - abar_t) eps) /
  sqrt(abar_t) (the learned variance channels as they are); a forecast step re-derives
  eps = (x - sqrt(abar_t) x0) / sqrt(1 - abar_t) from the *current* x and runs no part of the model.
  x0 moves smoothly along a sampling trajectory even when the sampler injects noise (DDPM,
  SDE-DPM-Solver++), where eps and the hidden features follow the fresh noise in x and cannot be
  extrapolated from past steps. abar_t: the training schedule at the model's timestep t
  (`alphas_cumprod`, default DiT's 1000-step linear schedule).
- ``"blocks"``: every block's attention and MLP outputs (TaylorSeer's choice). A forecast step
  runs the embeddings, all adaLN modulations and the gated residual updates
  x += gate * forecast, so the current conditioning gates the forecast features (adaLN-Zero and
  adaLN blocks only).

Schedule of a run of `num_steps` model calls, step s = 0, 1, ...: full for s < first_steps, for the
last `last_steps` steps, and when (s - first_steps + 1) is a multiple of `interval`; a forecast
otherwise. interval=1 is the uncached model exactly. order=0 reuses the last full step's features.

A run starts at the first call, after `num_steps` calls, when the timestep does not decrease or the
batch shape changes, or at `reset()`: nothing carries over from one run (batch) to the next, so
weights changed between runs are always seen. The schedule is decided on the host from the call
count (no synchronization), but the cache holds Python state across steps: it runs in the eager
loop only, not compiled or captured in a CUDA graph (LoopRunner mode "eager").
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..diffusion.gaussian_diffusion import get_named_beta_schedule
from ..models.dit import DiT
from .feature_cache import FeatureCache
from ..ops import gated_residual, taylor_forecast, taylor_weights
from ..ops.forecast import MAX_FACTORS

__all__ = ["TaylorCache", "FEATURES"]

FEATURES = ("output", "final", "blocks")


class TaylorCache(FeatureCache):
    """A DiT wrapper that forecasts features between full model evaluations (see module doc).

    :param model: the DiT (its weights are shared, not copied).
    :param num_steps: model calls per sampling run (the sampler's steps).
    :param interval: a full evaluation every `interval` steps (1: every step, no forecasting).
    :param order: order of the Taylor expansion (0: reuse the cached features).
    :param first_steps: steps always computed at the start of a run (>= 1).
    :param last_steps: steps always computed at the end of a run.
    :param features: "output", "final" or "blocks" (see module doc).
    :param alphas_cumprod: the training noise schedule's cumulative alphas, indexed by the model's
        timestep ("output" features; default: the 1000-step linear schedule DiT is trained with).
    """

    def __init__(self, model: DiT, num_steps: int, interval: int = 4, order: int = 1, first_steps: int = 2,
                 last_steps: int = 1, features: str = "output",
                 alphas_cumprod: Optional[Sequence[float]] = None) -> None:
        super().__init__(model)
        for name, value, lo in (("num_steps", num_steps, 1), ("interval", interval, 1), ("order", order, 0),
                                ("first_steps", first_steps, 1), ("last_steps", last_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        if order >= MAX_FACTORS:
            raise ValueError(f"order must be < {MAX_FACTORS}, got {order}")
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        if features == "blocks" and model.block not in ("adaLN-Zero", "adaLN"):
            raise ValueError(f"features='blocks' needs adaLN-Zero or adaLN blocks (gated residuals), the model has "
                             f"{model.block!r} blocks; use features='final'")
        if alphas_cumprod is None:
            betas = get_named_beta_schedule("linear", 1000)
            alphas_cumprod = np.cumprod(1.0 - betas)
        self.alphas_cumprod = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        self.num_steps = num_steps
        self.interval = interval
        self.order = order
        self.first_steps = first_steps
        self.last_steps = last_steps
        self.features = features
        self.num_full = 0            # full model evaluations since construction / reset_stats()
        self.num_forecast = 0        # forecast-only calls
        self.reset()

    def reset(self) -> None:
        """Forget the cached features (start of a new sampling run)."""
        self._step = 0
        self._last_t: Optional[float] = None
        self._shape: Optional[Tuple[int, ...]] = None
        self._full_steps: List[int] = []
        self._factors: Dict[str, torch.Tensor] = {}   # feature name -> (K, *shape) float32 factors
        self._valid = 0                                # factors holding data (<= order + 1)
        self._out: Dict[str, torch.Tensor] = {}        # feature name -> forecast buffer (feature dtype)

    def reset_stats(self) -> None:
        self.num_full = 0
        self.num_forecast = 0

    def is_full(self, step: int) -> bool:
        """Whether step `step` of a run evaluates the full model."""
        return (step < self.first_steps or step >= self.num_steps - self.last_steps
                or (step - self.first_steps + 1) % self.interval == 0)

    def schedule(self) -> List[bool]:
        """is_full for every step of a run."""
        return [self.is_full(s) for s in range(self.num_steps)]

    # ---- factors --------------------------------------------------------------------------

    def _update(self, name: str, feature: torch.Tensor, h: Optional[int], n_new: int) -> None:
        """Refresh one feature's factors from its value at a full step (h: steps since the last full
        step, None at a run's first)."""
        old = self._factors.get(name)
        acc = torch.float64 if feature.dtype == torch.float64 else torch.float32
        new = torch.empty((self.order + 1, *feature.shape), dtype=acc, device=feature.device)
        new[0].copy_(feature)
        for i in range(n_new - 1):                      # F_{i+1} = (F_i - F_i^prev) / h
            torch.sub(new[i], old[i], out=new[i + 1]).div_(h)
        self._factors[name] = new

    def _forecast(self, name: str, weights: List[float], like_dtype: torch.dtype) -> torch.Tensor:
        f = self._factors[name]
        out = self._out.get(name)
        if out is None or out.dtype != like_dtype:
            out = self._out[name] = torch.empty(f.shape[1:], dtype=like_dtype, device=f.device)
        return taylor_forecast(f[:len(weights)], weights, out=out)

    # ---- forward --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            raise RuntimeError("TaylorCache decides full / forecast steps on the host: run the sampling loop "
                               "eagerly (LoopRunner mode='eager'), not compiled or captured")
        m = self.model
        t = m.check_inputs(x, t, y)
        t_now = float(t.float().max())
        if self.features == "output" and not 0 <= float(t.min()) <= t_now < len(self.alphas_cumprod):
            raise ValueError(f"t must hold timesteps of the {len(self.alphas_cumprod)}-step training schedule "
                             f"(alphas_cumprod) for features='output', got values up to {t_now}")
        if (self._step >= self.num_steps or (self._last_t is not None and t_now >= self._last_t)
                or (self._shape is not None and self._shape != tuple(x.shape))):
            self.reset()
        self._last_t, self._shape = t_now, tuple(x.shape)
        step = self._step
        self._step += 1
        if self.is_full(step):
            self.num_full += 1
            h = step - self._full_steps[-1] if self._full_steps else None
            n_new = min(self._valid + 1, self.order + 1)
            self._full_steps.append(step)
            if self.features == "output":
                out = m.forward(x, t, y)                 # (N, C_out, H, W)
                self._update("output", self._eps_to_x0(out, x, t), h, n_new)
            else:
                out = self._full(x, t, y, h, n_new)
            self._valid = n_new
            return out
        self.num_forecast += 1
        weights = taylor_weights(step - self._full_steps[-1], self._valid)
        if self.features == "output":
            return self._x0_to_eps(self._forecast("output", weights, self._factors["output"].dtype), x, t)
        return self._forecast_step(x, t, y, weights)

    def _schedule(self, t: torch.Tensor, x: torch.Tensor):
        """(sqrt(abar_t), sqrt(1 - abar_t)) as (N, 1, 1, 1) float32 (float64 for float64 x)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        ab = self.alphas_cumprod.to(x.device)[t.long()].view(-1, 1, 1, 1)
        return ab.sqrt().to(dtype), (1.0 - ab).sqrt().to(dtype)

    def _eps_to_x0(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model output with its eps channels replaced by the x0 prediction (accumulator dtype)."""
        a, s = self._schedule(t, x)
        C = x.shape[1]
        self._out_dtype = out.dtype
        feat = out.to(a.dtype, copy=True)
        feat[:, :C] = (x.to(a.dtype) - s * feat[:, :C]) / a
        return feat

    def _x0_to_eps(self, feat: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._schedule(t, x)
        C = x.shape[1]
        feat[:, :C] = (x.to(a.dtype) - a * feat[:, :C]) / s   # in the forecast buffer
        return feat.to(self._out_dtype, copy=True)       # the caller owns its output

    def _full(self, x, t, y, h: Optional[int], n_new: int) -> torch.Tensor:
        """The full model, caching the "final" or "blocks" features."""
        m = self.model
        x, c, T = m.embed(x, t, y)                       # (N, T', D)
        mods = m.block_modulations(c)
        hooks = []
        if self.features == "blocks":
            def capture(name):
                def hook(module, args, out):
                    self._update(name, out, h, n_new)
                return hook
            for i, b in enumerate(m.blocks):
                hooks += [b.attn.register_forward_hook(capture(f"attn{i}")),
                          b.mlp.register_forward_hook(capture(f"mlp{i}"))]
        try:
            x, h_final = m.run_blocks(x, c, mods, 0, len(m.blocks))  # (N, T', D), fused final norm
        finally:
            for hk in hooks:
                hk.remove()
        if self.features == "final":
            self._update("final", x, h, n_new)
        return m.head(x, c, T, mods, h_final)

    def _forecast_step(self, x, t, y, weights: List[float]) -> torch.Tensor:
        m = self.model
        tokens, c, T = m.embed(x, t, y)                  # (N, T', D)
        if self.features == "final":
            # the final layer's adaLN modulation only (head reads mods[-1])
            mods = [m.final_layer.adaLN_modulation(c)] if m.final_layer.adaptive else None
            return m.head(self._forecast("final", weights, tokens.dtype), c, T, mods)
        mods = m.block_modulations(c)
        D = tokens.shape[-1]
        h = tokens
        for i in range(len(m.blocks)):
            a = self._forecast(f"attn{i}", weights, h.dtype)          # (N, T, D)
            mm = self._forecast(f"mlp{i}", weights, h.dtype)          # (N, T, D)
            if m.block == "adaLN-Zero":
                mod = mods[i].to(h.dtype)
                gate_msa, gate_mlp = mod[:, 2 * D:3 * D], mod[:, 5 * D:6 * D]  # (N, D) each
                h = gated_residual(gated_residual(h, a, gate_msa), mm, gate_mlp)  # (N, T, D)
            else:                                                       # adaLN: ungated residuals
                h = h + a + mm
        return m.head(h, c, T, mods)

    def extra_repr(self) -> str:
        return (f"num_steps={self.num_steps}, interval={self.interval}, order={self.order}, "
                f"first_steps={self.first_steps}, last_steps={self.last_steps}, features={self.features!r}")
