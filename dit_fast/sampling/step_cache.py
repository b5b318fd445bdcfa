"""Step caching for DiT sampling: skip the deep blocks when the shallow features barely move.

In the spirit of Learning-to-Cache (Ma et al. 2024), FORA (Selvaraju et al. 2024) and TeaCache
(Liu et al. 2024): consecutive denoising steps compute nearly the same residual in the deep blocks.
`StepCache` wraps a DiT and, at every call,

1. runs the embeddings and the first `shallow_blocks` blocks (the probe);
2. adds the relative L1 change of the probe output against the previous call,
   mean|h - h_prev| / mean|h_prev|, to an accumulator;
3. if the accumulator is below `threshold` (and a cached residual exists for this batch shape),
   reuses the cached residual of the deep blocks: h_out = h + residual; otherwise runs the deep
   blocks, caches residual = h_out - h and resets the accumulator.

The final layer always runs with the current conditioning. The first call of a sampling run always
computes; a new run is detected when the timestep does not decrease (or the batch shape changes),
or by calling `reset()` (sample_loop does). One decision covers the whole batch, so a reused step
saves the deep blocks' compute for real. `forward_with_cfg` works as DiT's (the guided and the
unguided halves share the decision). threshold=0 never reuses (identical to the plain model).

The decision needs the accumulator on the host (one synchronization per step): step caching runs
eagerly, not inside a CUDA graph.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..models.dit import DiT
from .feature_cache import FeatureCache

__all__ = ["StepCache"]


class StepCache(FeatureCache):
    """A DiT wrapper that reuses the deep blocks' residual across sampling steps (see module doc).

    :param model: the DiT (its weights are shared, not copied).
    :param threshold: accumulated relative L1 change of the probe below which a step is reused.
    :param shallow_blocks: blocks always run (the probe), 1 <= shallow_blocks < depth.
    :param max_reuse: at most this many consecutive reused steps (None: no limit).
    """

    def __init__(self, model: DiT, threshold: float = 0.1, shallow_blocks: int = 1,
                 max_reuse: Optional[int] = None) -> None:
        super().__init__(model)
        depth = len(model.blocks)
        if not isinstance(shallow_blocks, int) or not 1 <= shallow_blocks < depth:
            raise ValueError(f"shallow_blocks must be an int in [1, {depth - 1}] for a depth-{depth} model, "
                             f"got {shallow_blocks!r}")
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold!r}")
        if max_reuse is not None and (not isinstance(max_reuse, int) or max_reuse < 1):
            raise ValueError(f"max_reuse must be None or a positive int, got {max_reuse!r}")
        self.threshold = float(threshold)
        self.shallow_blocks = shallow_blocks
        self.max_reuse = max_reuse
        self.num_calls = 0          # forward calls since construction / reset_stats()
        self.num_reused = 0         # of which reused the deep blocks
        self.changes = []           # relative L1 change of the probe at each call after a run's first
        self.reset()

    def reset(self) -> None:
        """Forget the cache (start of a new sampling run)."""
        self._prev_probe: Optional[torch.Tensor] = None
        self._residual: Optional[torch.Tensor] = None
        self._last_t: Optional[float] = None
        self._acc = 0.0
        self._run = 0

    def reset_stats(self) -> None:
        self.num_calls = 0
        self.num_reused = 0
        self.changes = []

    @property
    def reuse_fraction(self) -> float:
        """Fraction of calls that reused the deep blocks."""
        return self.num_reused / self.num_calls if self.num_calls else 0.0

    @property
    def deep_fraction(self) -> float:
        """Fraction of the transformer blocks that are cached (skipped on a reused call)."""
        return 1.0 - self.shallow_blocks / len(self.model.blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = self.model
        t = m.check_inputs(x, t, y)
        t_now = float(t.float().max())
        if self._last_t is not None and (t_now >= self._last_t or self._prev_probe is None
                                         or self._prev_probe.shape[0] != x.shape[0]):
            self.reset()
        self._last_t = t_now

        # the model's own fused pieces (DiT.forward): embeddings, adaLN modulations of all layers in
        # one GEMM, blocks with the cross-block LayerNorm fusion inside each range
        h, c, T = m.embed(x, t, y)                       # (N, T', D)
        mods = m.block_modulations(c)
        h, _ = m.run_blocks(h, c, mods, 0, self.shallow_blocks)
        reuse = False
        if self._prev_probe is not None and self._residual is not None and self._residual.shape == h.shape:
            prev = self._prev_probe
            change = float((h - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
            self.changes.append(change)
            self._acc += change
            reuse = self._acc < self.threshold and (self.max_reuse is None or self._run < self.max_reuse)
        self._prev_probe = h
        self.num_calls += 1
        h_final = None                                    # the fused final norm, when the deep blocks run
        if reuse:
            self.num_reused += 1
            self._run += 1
            h = h + self._residual
        else:
            h_deep, h_final = m.run_blocks(h, c, mods, self.shallow_blocks, len(m.blocks))
            self._residual = h_deep - h
            self._acc = 0.0
            self._run = 0
            h = h_deep
        return m.head(h, c, T, mods, h_final)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, shallow_blocks={self.shallow_blocks}, max_reuse={self.max_reuse}"
