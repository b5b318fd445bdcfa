# Timestep samplers for training (uniform and loss-aware importance sampling).
#
# Follows facebookresearch/DiT `diffusion/timestep_sampler.py`, taken from OpenAI's guided-diffusion
# (https://github.com/openai/guided-diffusion/blob/main/guided_diffusion/resample.py, MIT license).
# Re-implemented for dit_fast with the same public names and behaviour.

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "create_named_schedule_sampler",
    "ScheduleSampler",
    "UniformSampler",
    "LossAwareSampler",
    "LossSecondMomentResampler",
]


def create_named_schedule_sampler(name: str, diffusion: Any) -> "ScheduleSampler":
    """Build a sampler by name: "uniform" or "loss-second-moment"."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"name: unknown schedule sampler {name!r}; expected 'uniform' or 'loss-second-moment'")


class ScheduleSampler(ABC):
    """A distribution over timesteps, used to reduce the variance of the objective.

    By default sampling is unbiased importance sampling (the objective's mean is unchanged);
    subclasses may override sample() to reweight differently.
    """

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Positive (not necessarily normalized) weight per diffusion step."""

    def sample(self, batch_size: int, device: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """Importance-sample `batch_size` timesteps; returns (timesteps, loss weights)."""
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = torch.from_numpy(indices_np).long().to(device)
        weights_np = 1 / (len(p) * p[indices_np])
        weights = torch.from_numpy(weights_np).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion: Any) -> None:
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self) -> np.ndarray:
        return self._weights


class LossAwareSampler(ScheduleSampler):
    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Update the reweighting from this rank's (timesteps, losses); syncs across ranks.

        Every rank must call this so that all ranks keep identical state.
        """
        world = dist.get_world_size()
        batch_sizes_t = [torch.tensor([0], dtype=torch.int32, device=local_ts.device) for _ in range(world)]
        dist.all_gather(batch_sizes_t, torch.tensor([len(local_ts)], dtype=torch.int32, device=local_ts.device))

        # all_gather needs equal sizes: pad every batch to the largest one
        batch_sizes = [int(x.item()) for x in batch_sizes_t]
        max_bs = max(batch_sizes)
        timestep_batches = [torch.zeros(max_bs).to(local_ts) for _ in batch_sizes]
        loss_batches = [torch.zeros(max_bs).to(local_losses) for _ in batch_sizes]
        dist.all_gather(timestep_batches, local_ts)
        dist.all_gather(loss_batches, local_losses)
        timesteps = [x.item() for y, bs in zip(timestep_batches, batch_sizes) for x in y[:bs]]
        losses = [x.item() for y, bs in zip(loss_batches, batch_sizes) for x in y[:bs]]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        """Update the reweighting from all ranks' (timesteps, losses), without synchronizing.

        Called with identical arguments on every rank, so it must be deterministic.
        """


class LossSecondMomentResampler(LossAwareSampler):
    def __init__(self, diffusion: Any, history_per_term: int = 10, uniform_prob: float = 0.001) -> None:
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        for t, loss in zip(ts, losses):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                # shift out the oldest loss
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())
