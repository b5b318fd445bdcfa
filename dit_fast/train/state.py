"""Training checkpoints: atomic writes, rotation, resume lookup and RNG state capture.

A checkpoint is the official train.py dict (`model`, `ema`, `opt`, `args`) plus what an exact resume
needs (`step`, `epoch`, `rng` per rank, `data`, `config`). Everything in it is a tensor, a plain
Python value or the argparse.Namespace of the run, so it loads with torch.load(weights_only=True)
(dit_fast.checkpoint reads the `ema`/`model` weights and the `config` of it).
"""
import argparse
import os
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np
import torch

from ..checkpoint import io_reason, torch_load

FORMAT = "dit_fast.train/1"
CKPT_DIR = "checkpoints"
_CKPT_RE = re.compile(r"^(\d{7,})\.pt$")
# Changing these on --resume gives a run that is no longer the continuation of the original one.
ORDER_ARGS = ("global_seed", "global_batch_size", "data_path", "dataset", "image_size")


def checkpoint_path(results_dir, step: int) -> Path:
    return Path(results_dir) / CKPT_DIR / f"{step:07d}.pt"


def atomic_save(obj: Any, path) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`:
    a crash mid-write leaves any previous file at `path` intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:  # a full disk: torch's zip writer fails first, then the file's close
        raise OSError(f"cannot write checkpoint {path}: {io_reason(e)}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - directories cannot be fsync'ed on some filesystems
        pass


def list_checkpoints(ckpt_dir) -> List[Tuple[int, Path]]:
    """(step, path) of the complete checkpoints in `ckpt_dir`, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def prune(ckpt_dir, keep_last: int) -> List[Path]:
    """Delete all but the `keep_last` newest checkpoints (0 keeps all); returns the deleted paths."""
    if keep_last <= 0:
        return []
    ckpts = list_checkpoints(ckpt_dir)
    doomed = [p for _, p in ckpts[:-keep_last]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def remove_stale_temporaries(ckpt_dir) -> None:
    """Temporary files left by a process killed mid-write."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(".*.tmp"):
            p.unlink(missing_ok=True)


def resolve_resume(path) -> Path:
    """A checkpoint file as given, or the newest checkpoint of a run directory / checkpoints dir."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for d in (p / CKPT_DIR, p):
            ckpts = list_checkpoints(d)
            if ckpts:
                return ckpts[-1][1]
        raise ValueError(f"--resume {str(path)!r}: no checkpoints (NNNNNNN.pt) in this directory")
    raise ValueError(f"--resume {str(path)!r}: no such file or directory")


def run_dir_of(ckpt: Path) -> Path:
    """RUN for RUN/checkpoints/NNNNNNN.pt (else the file's directory)."""
    ckpt = Path(ckpt).resolve()
    return ckpt.parent.parent if ckpt.parent.name == CKPT_DIR else ckpt.parent


def load(path) -> Dict[str, Any]:
    """Read a training checkpoint with weights_only=True (the run's argparse.Namespace allowed)."""
    obj = torch_load(path, "--resume: checkpoint")  # a truncated or foreign file: one line naming it
    missing = [k for k in ("model", "ema", "opt", "args", "step") if k not in obj] if isinstance(obj, dict) else ["*"]
    if missing:
        raise ValueError(f"--resume: {str(path)!r} is not a resumable training checkpoint "
                         f"(missing {', '.join(missing)})")
    return obj


# --------------------------------------------------------------------------- the run's arguments

def plain_args(args: argparse.Namespace) -> argparse.Namespace:
    """A Namespace of plain values only (weights_only-loadable)."""
    out = argparse.Namespace()
    for k, v in vars(args).items():
        if isinstance(v, Path):
            v = str(v)
        if v is None or isinstance(v, (bool, int, float, str)):
            setattr(out, k, v)
        elif isinstance(v, (list, tuple)) and all(isinstance(e, (bool, int, float, str)) for e in v):
            setattr(out, k, list(v))
    return out


def merge_resume_args(args: argparse.Namespace, saved: argparse.Namespace, explicit: Optional[Set[str]],
                      ckpt_path: Path, logger_msgs: list) -> argparse.Namespace:
    """The saved run's arguments, updated with the ones given now (all of them for the Python API)."""
    merged = argparse.Namespace(**vars(saved))
    if explicit is None:  # the Python API: the arguments set away from their defaults
        from .args import defaults

        base = vars(defaults())
        explicit = {k for k, v in vars(args).items() if k not in base or base[k] != v}
    for k, v in vars(args).items():
        if k in explicit or not hasattr(merged, k):
            setattr(merged, k, v)
    if "results_dir" not in explicit:
        merged.results_dir = str(run_dir_of(ckpt_path))
    merged.resume = str(ckpt_path)
    changed = [k for k in ORDER_ARGS if getattr(saved, k, None) != getattr(merged, k, None)
               and hasattr(saved, k)]
    if changed:
        logger_msgs.append("warning: --resume with changed " + ", ".join("--" + c.replace("_", "-") for c in changed)
                           + ": the data order will differ from the original run")
    return merged


# --------------------------------------------------------------------------- RNG state

def rng_state(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """This process's RNG states as tensors and plain values (weights_only-loadable)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: Optional[torch.device] = None) -> None:
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), int(n["pos"]),
                         int(n["has_gauss"]), float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
