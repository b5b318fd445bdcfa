"""Denoising loops for DDPM, DDIM and DPM-Solver++, eager, compiled or CUDA-graph captured.

Every sampler is a *stepper*: `step(model, x, i, state, model_kwargs, clip_denoised, noise)` is one
model evaluation plus the sampler's update, written as pure tensor code (the step index `i` is an
int64 device tensor; schedule values are gathered from device tables), so the same step can run

- eagerly (`mode="eager"`), bit-identical to the official `p_sample_loop` / `ddim_sample_loop`
  for the same seed: noise is drawn with `torch.randn_like` once per step, as they do;
- compiled with `torch.compile` (`mode="compile"`);
- captured once in a CUDA graph with static buffers and replayed for every step
  (`mode="cuda_graph"`; `mode="compile_cuda_graph"` captures the compiled step). Per-step inputs
  (step index, noise) are copied into the static buffers before each replay, so a captured loop
  draws the same random numbers as the eager one. GPU only; requires static shapes.

The per-step arithmetic after the model call is the diffusion's `_p_sample_step` / `_ddim_step`
and `dpm_solver_pp_update` (the reference of the fused step DPMSolverPlusPlus runs).
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _backends
from ..diffusion import create_diffusion
from ..diffusion.dpm_solver import DPMSolverPlusPlus, create_dpm_solver
from ..diffusion.gaussian_diffusion import GaussianDiffusion

__all__ = ["SAMPLERS", "MODES", "DiffusionStepper", "LoopRunner", "find_step_cache", "make_sampler", "sample_loop",
           "default_steps", "model_modules", "weights_key"]

SAMPLERS = ("ddpm", "ddim", "dpm-solver++", "sde-dpm-solver++")
MODES = ("eager", "compile", "cuda_graph", "compile_cuda_graph")

Model = Callable[..., Any]


def default_steps(sampler: str) -> int:
    """Default number of steps for a sampler: 250 (DDPM, the official default), 50 (DDIM), 20 (DPM-Solver++)."""
    return {"ddpm": 250, "ddim": 50, "dpm-solver++": 20, "sde-dpm-solver++": 20}[sampler]


class DiffusionStepper:
    """DDPM (ancestral) or DDIM steps of a (spaced) GaussianDiffusion, as steppers."""

    def __init__(self, diffusion: GaussianDiffusion, kind: str = "ddpm", eta: float = 0.0) -> None:
        if kind not in ("ddpm", "ddim"):
            raise ValueError(f"kind must be 'ddpm' or 'ddim', got {kind!r}")
        self.diffusion = diffusion
        self.kind = kind
        self.eta = float(eta)
        self.num_steps = diffusion.num_timesteps
        # DDIM with eta = 0 ignores the noise, but it is drawn anyway, as the official loop does,
        # so that the random stream after sampling is the same.
        self.uses_noise = True

    def step_indices(self) -> List[int]:
        return list(range(self.num_steps))[::-1]

    def init_state(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {}

    def step(self, model: Model, x: torch.Tensor, i: torch.Tensor, state: Dict[str, torch.Tensor],
             model_kwargs: Optional[Dict[str, Any]] = None, clip_denoised: bool = False,
             noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
        d = self.diffusion
        model_output = d._wrap_model(model)(x, i, **(model_kwargs or {}))
        if self.kind == "ddpm":
            out = d._p_sample_step(model_output, x, i, noise, clip_denoised)
        else:
            out = d._ddim_step(model_output, x, i, noise, self.eta, clip_denoised)
        return out["sample"], state, out["pred_xstart"]

    def __repr__(self) -> str:
        return f"DiffusionStepper(kind={self.kind!r}, num_steps={self.num_steps}, eta={self.eta})"


class _DPMStepper:
    """DPMSolverPlusPlus as a stepper (noise per step for the SDE variant only)."""

    def __init__(self, solver: DPMSolverPlusPlus) -> None:
        self.solver = solver
        self.num_steps = solver.num_steps
        self.uses_noise = solver.sde

    def step_indices(self) -> List[int]:
        return self.solver.step_indices()

    def init_state(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.solver.init_state(x)

    def step(self, model, x, i, state, model_kwargs=None, clip_denoised=False, noise=None):
        return self.solver.step(model, x, i, state, model_kwargs, clip_denoised, noise)

    def __repr__(self) -> str:
        return f"_DPMStepper({self.solver!r})"


def make_sampler(name: str, num_steps: Optional[int] = None, *, eta: float = 0.0, skip_type: str = "time_uniform",
                 noise_schedule: str = "linear", diffusion_steps: int = 1000, learn_sigma: bool = True):
    """A stepper by name: "ddpm" (create_diffusion(str(num_steps)) + p_sample), "ddim" (the same
    respacing + ddim_sample, eta), "dpm-solver++" (DPM-Solver++(2M), skip_type) or "sde-dpm-solver++"
    (its stochastic variant). learn_sigma: the model outputs a variance too (DiT's default); False
    gives ddpm the fixed variance of create_diffusion(learn_sigma=False)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
    if num_steps is None:
        num_steps = default_steps(name)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= diffusion_steps:
        raise ValueError(f"num_steps must be an int in [1, {diffusion_steps}], got {num_steps!r}")
    if name in ("dpm-solver++", "sde-dpm-solver++"):
        return _DPMStepper(create_dpm_solver(num_steps, noise_schedule=noise_schedule,
                                             diffusion_steps=diffusion_steps, skip_type=skip_type,
                                             sde=name.startswith("sde")))
    diffusion = create_diffusion(str(num_steps), noise_schedule=noise_schedule, diffusion_steps=diffusion_steps,
                                 learn_sigma=learn_sigma)
    return DiffusionStepper(diffusion, kind=name, eta=eta)


def _as_stepper(sampler):
    if isinstance(sampler, DPMSolverPlusPlus):
        return _DPMStepper(sampler)
    if isinstance(sampler, GaussianDiffusion):
        return DiffusionStepper(sampler, "ddpm")
    if not all(hasattr(sampler, a) for a in ("step", "step_indices", "init_state")):
        raise ValueError(f"sampler must be a stepper (make_sampler), a GaussianDiffusion or a DPMSolverPlusPlus, "
                         f"got {type(sampler).__name__}")
    return sampler


def find_step_cache(model: Model) -> Any:
    """The StepCache behind `model` (a StepCache, one of its bound methods, or a wrapper exposing it
    as `__wrapped__`), else None."""
    from .step_cache import StepCache

    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, StepCache):
            return model
        owner = getattr(model, "__self__", None)
        if isinstance(owner, StepCache):
            return owner
        model = getattr(model, "__wrapped__", None)
        seen += 1
    return None


def model_modules(model: Model) -> List[torch.nn.Module]:
    """The nn.Modules behind a model callable: the callable itself, a bound method's owner, the
    function and arguments of a functools.partial, `__wrapped__`, and modules a closure captured
    (e.g. ``lambda x, t, **kw: dit.forward_with_cfg(x, t, **kw)``). A module reached only through
    a global name is not found: pass the module or one of its methods."""
    found: List[torch.nn.Module] = []
    todo, seen = [model], set()
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen or len(seen) > 64:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            found.append(obj)
            continue
        todo += [getattr(obj, "__self__", None), getattr(obj, "__wrapped__", None), getattr(obj, "func", None)]
        if isinstance(obj, functools.partial):
            todo += [*obj.args, *obj.keywords.values()]
        todo += [cell.cell_contents for cell in (getattr(obj, "__closure__", None) or ())
                 if _cell_filled(cell)]
    return found


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def weights_key(model: Model) -> tuple:
    """The identity of every parameter and buffer of the modules behind `model` (address, dtype,
    device, shape, strides) and their train/eval flags: it changes whenever something re-points
    weight memory (``param.data = ...``, ``.to()``, ``load_state_dict(assign=True)``, a swapped
    submodule, the adaLN buffer re-aliased) or switches a mode, which a captured CUDA graph would
    otherwise silently ignore."""
    key = []
    for module in model_modules(model):
        key.append(tuple(m.training for m in module.modules()))
        for t in itertools.chain(module.parameters(), module.buffers()):
            key.append((t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride()))
    return tuple(key)


class LoopRunner:
    """A reusable denoising loop: `runner(noise, model_kwargs)` -> samples.

    Keeps the compiled step and, in the CUDA-graph modes, the captured graph with its static buffers
    across calls, so that sampling many batches of one shape (sample_ddp) compiles and captures once.
    A call whose shapes, dtypes or non-tensor model_kwargs differ from the captured ones recaptures,
    and so does one after the model's weights were re-pointed (see `weights_key`); in-place weight
    updates are read by the captured graph as they are.

    :param model: callable model(x, t, **model_kwargs), e.g. `dit` or `dit.forward_with_cfg`.
    :param sampler: a stepper (make_sampler), a GaussianDiffusion (DDPM steps) or a DPMSolverPlusPlus.
    :param mode: "eager", "compile", "cuda_graph" or "compile_cuda_graph" (see the module docstring).
    :param compile_kwargs: keyword arguments for torch.compile (default: dynamic=False).
    """

    def __init__(self, model: Model, sampler, mode: str = "eager", clip_denoised: bool = False,
                 compile_kwargs: Optional[Dict[str, Any]] = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.stepper = _as_stepper(sampler)
        self.model = model
        self.mode = mode
        self.clip_denoised = clip_denoised
        self.step_cache = find_step_cache(model)
        if self.step_cache is not None and mode != "eager":
            raise ValueError(f"mode={mode!r}: step caching decides on the host at every step and cannot be "
                             "compiled or captured; use mode='eager' with a StepCache")
        self._kwargs: Dict[str, Any] = {}          # the model_kwargs the step reads (static buffers when captured)
        self._step = self._eager_step
        if mode in ("compile", "compile_cuda_graph"):
            self._step = torch.compile(self._eager_step, **{"dynamic": False, **(compile_kwargs or {})})
        self._graph = None
        self._graph_key = None
        self._warm = False

    def _eager_step(self, x, i, noise, state):
        x_next, state, _ = self.stepper.step(self.model, x, i, state, self._kwargs, self.clip_denoised, noise)
        return x_next, state

    def _draw_noise(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return torch.randn_like(x) if self.stepper.uses_noise else None

    def _warmup(self, x: torch.Tensor, step, n_iter: int = 1) -> None:
        """Run the step on copies (no random numbers drawn), so lazily built schedule tables exist
        before compilation / capture and do not trigger recompilation."""
        i = torch.full((x.shape[0],), self.stepper.step_indices()[0], device=x.device, dtype=torch.long)
        noise = torch.zeros_like(x) if self.stepper.uses_noise else None
        for _ in range(n_iter):
            state = {k: v.clone() for k, v in self.stepper.init_state(x).items()}
            step(x.clone(), i, noise, state)

    def __call__(self, noise: torch.Tensor, model_kwargs: Optional[Dict[str, Any]] = None,
                 progress: bool = False) -> torch.Tensor:
        if not isinstance(noise, torch.Tensor):
            raise ValueError(f"noise must be a tensor, got {type(noise).__name__}")
        if self.mode in ("cuda_graph", "compile_cuda_graph") and noise.device.type != "cuda":
            raise ValueError(f"mode={self.mode!r} needs CUDA tensors, got device {noise.device}")
        if self.step_cache is not None:
            self.step_cache.reset()
        indices: Any = self.stepper.step_indices()
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        with torch.no_grad():
            if self.mode in ("eager", "compile"):
                self._kwargs = dict(model_kwargs or {})
                if self.mode == "compile" and not self._warm:
                    self._warmup(noise, self._eager_step)
                    self._warm = True
                return self._run(noise, indices)
            return self._run_graph(noise, dict(model_kwargs or {}), indices)

    def _run(self, x: torch.Tensor, indices) -> torch.Tensor:
        state = self.stepper.init_state(x)
        n = x.shape[0]
        for idx in indices:
            i = torch.full((n,), idx, device=x.device, dtype=torch.long)
            x, state = self._step(x, i, self._draw_noise(x), state)
        return x

    def _key(self, x: torch.Tensor, kwargs: Dict[str, Any]):
        """What a captured graph depends on beyond the values in memory: the shapes, dtypes and
        devices of the inputs, the non-tensor model_kwargs, the requested backend, and the model's
        weights' identity (`weights_key`). In-place weight updates (optimizer steps,
        load_state_dict, EMA ``param.data.copy_``) keep the key: the graph reads them."""
        def sig(v):
            return ("T", tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else ("V", repr(v))
        return (tuple(x.shape), x.dtype, x.device, tuple(sorted((k, sig(v)) for k, v in kwargs.items())),
                _backends.requested_backend(), weights_key(self.model))

    def _run_graph(self, x: torch.Tensor, kwargs: Dict[str, Any], indices) -> torch.Tensor:
        """Replay one captured step for every step (see the module docstring)."""
        if self._graph is None or self._key(x, kwargs) != self._graph_key:
            self._capture(x, kwargs)
            # after the capture: its warm-up may re-point weights once (the adaLN buffer re-aliases)
            self._graph_key = self._key(x, kwargs)
        g = self._graph
        g["x"].copy_(x)
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                g["kwargs"][k].copy_(v)
        for k, v in self.stepper.init_state(x).items():
            g["state"][k].copy_(v)
        for idx in indices:
            g["i"].fill_(idx)
            if g["noise"] is not None:
                g["noise"].copy_(torch.randn_like(x))
            g["graph"].replay()
            g["x"].copy_(g["out_x"])
            for k, v in g["out_state"].items():
                g["state"][k].copy_(v)
        return g["x"].clone()

    def _capture(self, x: torch.Tensor, kwargs: Dict[str, Any]) -> None:  # pragma: no cover - GPU only
        self._graph = None
        static_kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        self._kwargs = static_kwargs
        static_x = x.clone()
        static_i = torch.full((x.shape[0],), self.stepper.step_indices()[0], device=x.device, dtype=torch.long)
        static_noise = torch.zeros_like(x) if self.stepper.uses_noise else None
        static_state = {k: v.clone() for k, v in self.stepper.init_state(x).items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._warmup(static_x, self._eager_step, n_iter=3)
            if self._step is not self._eager_step:
                self._warmup(static_x, self._step, n_iter=2)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_x, out_state = self._step(static_x, static_i, static_noise, static_state)
        self._graph = dict(graph=graph, x=static_x, i=static_i, noise=static_noise, state=static_state,
                           kwargs=static_kwargs, out_x=out_x, out_state=out_state)


def sample_loop(
    model: Model,
    shape: Sequence[int],
    sampler,
    noise: Optional[torch.Tensor] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    clip_denoised: bool = False,
    device: Any = None,
    progress: bool = False,
    mode: str = "eager",
    compile_kwargs: Optional[Dict[str, Any]] = None,
) -> torch.Tensor:
    """Run `sampler` (see make_sampler) from noise of `shape` to samples (a one-shot LoopRunner).

    :param model: callable model(x, t, **model_kwargs), e.g. `dit` or `dit.forward_with_cfg`
        (or a StepCache's, which is reset first).
    :param noise: starting noise x_T (default: torch.randn(shape) on `device`, else the model's).
    :param mode: "eager", "compile", "cuda_graph" or "compile_cuda_graph" (see the module docstring).
    :param compile_kwargs: keyword arguments for torch.compile (default: dynamic=False).
    """
    runner = LoopRunner(model, sampler, mode=mode, clip_denoised=clip_denoised, compile_kwargs=compile_kwargs)
    if not isinstance(shape, (tuple, list)):
        raise ValueError(f"shape must be a tuple or list like (N, C, H, W), got {type(shape).__name__}")
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(noise.shape)}")
    else:
        if device is None:
            from ..diffusion.gaussian_diffusion import _infer_device

            device = _infer_device(model)
        noise = torch.randn(*shape, device=device)
    return runner(noise, model_kwargs, progress=progress)
