# Timestep respacing: run a diffusion process on a subset of the original timesteps.
#
# Follows facebookresearch/DiT `diffusion/respace.py`, adapted from OpenAI's guided-diffusion
# (https://github.com/openai/guided-diffusion/blob/main/guided_diffusion/respace.py, MIT license).
# Re-implemented for dit_fast with the same public names and behaviour.

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion, Model

__all__ = ["space_timesteps", "SpacedDiffusion"]


def _parse_section_counts(section_counts: str) -> List[int]:
    try:
        return [int(part) for part in section_counts.split(",")]
    except ValueError:
        raise ValueError(
            f"section_counts: cannot parse {section_counts!r}; expected comma-separated step counts "
            "like '250' or '10,10,10', or 'ddimN'"
        ) from None


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> Set[int]:
    """Timesteps to keep from a `num_timesteps`-step process.

    The process is cut into ``len(section_counts)`` equal portions and portion i is strided down to
    ``section_counts[i]`` steps, e.g. 300 steps with [10, 15, 20] -> 10 steps from the first 100,
    15 from the second, 20 from the last. `section_counts` may also be a comma-separated string
    ("250", "10,10,10") or "ddimN", which uses the DDIM paper's fixed integer stride (one section),
    or an int (one section: 250 is "250").
    """
    if isinstance(section_counts, (int, np.integer)) and not isinstance(section_counts, bool):
        section_counts = [int(section_counts)]
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired_count = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(f"section_counts: cannot parse {section_counts!r}; expected 'ddimN' with N an integer") from None
            for stride in range(1, num_timesteps):
                steps = range(0, num_timesteps, stride)
                if len(steps) == desired_count:
                    return set(steps)
            raise ValueError(
                f"section_counts: cannot create exactly {desired_count} steps out of {num_timesteps} "
                "with an integer stride"
            )
        section_counts = _parse_section_counts(section_counts)
    try:
        section_counts = list(section_counts)
    except TypeError:
        raise ValueError(f"section_counts must be an int, a string like '250', '10,10,10' or 'ddim50', or a "
                         f"sequence of ints, got {type(section_counts).__name__}") from None
    if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in section_counts):
        raise ValueError(f"section_counts must hold integers, got {section_counts}")
    if not section_counts:
        raise ValueError("section_counts must name at least one section")
    if any(c < 0 for c in section_counts):
        raise ValueError(f"section_counts must be non-negative, got {section_counts}")

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start_idx = 0
    all_steps: List[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"section_counts: cannot divide a section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion process that keeps only `use_timesteps` of a base process.

    :param use_timesteps: timesteps of the original process to retain (any collection).
    :param kwargs: the GaussianDiffusion kwargs of the base process.

    Models are called with the *original* timesteps: timestep i of this process maps to
    ``timestep_map[i]``.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs: Any) -> None:
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base = GaussianDiffusion(**kwargs)
        bad = sorted(s for s in self.use_timesteps if not 0 <= s < self.original_num_steps)
        if bad:
            raise ValueError(f"use_timesteps must lie in [0, {self.original_num_steps}), got {bad[:5]}")
        if not self.use_timesteps:
            raise ValueError("use_timesteps must keep at least one timestep")

        # new betas so that the kept steps have the base process's alphas_cumprod
        self.timestep_map: List[int] = []
        new_betas = []
        last_alpha_cumprod = 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self._map_cache: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _wrap_model(self, model: Model) -> Model:
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.original_num_steps, _cache=self._map_cache)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return t  # the wrapped model maps timesteps


class _WrappedModel:
    """Calls `model` with timesteps mapped through `timestep_map`."""

    def __init__(
        self,
        model: Model,
        timestep_map: Sequence[int],
        original_num_steps: int,
        *,
        _cache: Optional[Dict[Tuple[torch.device, torch.dtype], torch.Tensor]] = None,
    ) -> None:
        self.model = model
        self.timestep_map = timestep_map
        self.original_num_steps = original_num_steps
        # (device, dtype) -> timestep_map as a tensor; shared with the owning SpacedDiffusion
        self._map_cache = {} if _cache is None else _cache

    def __call__(self, x: torch.Tensor, ts: torch.Tensor, **kwargs: Any) -> Any:
        key = (ts.device, ts.dtype)
        map_tensor = self._map_cache.get(key)
        if map_tensor is None:
            map_tensor = self._map_cache[key] = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        return self.model(x, map_tensor[ts], **kwargs)
