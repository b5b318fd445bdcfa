"""Sampling loops (eager, compiled, CUDA-graph captured) and feature caches (StepCache, TaylorCache) for DiT.

    from dit_fast.sampling import make_sampler, sample_loop, StepCache
    sampler = make_sampler("dpm-solver++", 20)
    samples = sample_loop(model.forward_with_cfg, z.shape, sampler, noise=z,
                          model_kwargs=dict(y=y, cfg_scale=4.0))
"""
from .loops import (MODES, SAMPLERS, DiffusionStepper, LoopRunner, default_steps, find_step_cache, make_sampler,
                    sample_loop)
from .step_cache import StepCache
from .taylor_cache import TaylorCache

__all__ = ["MODES", "SAMPLERS", "DiffusionStepper", "LoopRunner", "StepCache", "TaylorCache", "default_steps", "find_step_cache",
           "make_sampler", "sample_loop"]
