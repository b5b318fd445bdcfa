"""Loading and saving DiT checkpoints.

Reads every layout a DiT user meets:
- the published plain state dicts (`DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt`);
- the official `train.py` checkpoints, a dict with `model`, `ema`, `opt`, `args` (the EMA weights
  are taken by default, as the official `sample.py` does);
- safetensors files (ours carry the model configuration in their metadata);
- state dicts saved from a DDP-wrapped (`module.`) or `torch.compile`d (`_orig_mod.`) model.

A file that cannot be read (empty, truncated, foreign, a bad safetensors header or metadata) or does
not fit the model raises ValueError with one line naming the file; a failed write raises OSError
naming the file and the reason (e.g. "No space left on device") and leaves no temporary file.
"""
import argparse
import json
import os
import pickle
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from .models.dit import DiT, DiT_configs

PRETRAINED = {
    # file name -> (model name, image size) of the checkpoints published with the paper.
    "DiT-XL-2-256x256.pt": ("DiT-XL/2", 256),
    "DiT-XL-2-512x512.pt": ("DiT-XL/2", 512),
}
PRETRAINED_URL = "https://dl.fbaipublicfiles.com/DiT/models/{}"
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_CONFIG_KEY = "dit_config"

PathLike = Union[str, os.PathLike]


def cache_dir() -> Path:
    """Where downloaded checkpoints live: $DIT_FAST_CACHE, else ~/.cache/dit_fast."""
    return Path(os.environ.get("DIT_FAST_CACHE", Path.home() / ".cache" / "dit_fast"))


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's first line (torch's messages run on with advice)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    return text.split(". ")[0].rstrip(".") or type(e).__name__


def io_reason(e: BaseException) -> str:
    """The OS's reason behind a failed read/write (e.g. 'No space left on device'), else the first line."""
    seen: Optional[BaseException] = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return _first_line(e)


def torch_load(path: PathLike, what: str = "checkpoint", **kwargs):
    """torch.load(path, map_location="cpu", weights_only=True) (the argparse.Namespace of official
    train.py checkpoints allowed); any failure is one ValueError line naming `what` and the file."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{what} {path}: the file is empty")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError:
        raise ValueError(f"{what} {path}: not a readable torch checkpoint (a foreign or corrupt file: it holds "
                         f"data other than tensors and plain values)") from None
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot read it: {io_reason(e)}") from None
    except Exception as e:  # truncated zip archives, legacy-format garbage (KeyError), ...
        raise ValueError(f"{what} {path}: not a readable torch checkpoint (truncated or corrupt?): "
                         f"{type(e).__name__}: {_first_line(e)}") from None


def _read_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path}: the file is empty")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # SafetensorError (no stable import path across versions), OSError
        raise ValueError(f"checkpoint {path}: not a readable safetensors file: {io_reason(e)}") from None
    out: dict = {"model": tensors}
    if _CONFIG_KEY in metadata:
        try:
            config = json.loads(metadata[_CONFIG_KEY])
        except ValueError as e:
            raise ValueError(f"checkpoint {path}: its {_CONFIG_KEY!r} metadata is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"checkpoint {path}: its {_CONFIG_KEY!r} metadata must be a JSON object of DiT "
                             f"arguments, got a {type(config).__name__}")
        out["config"] = config
    return out


def _read(path: PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = torch_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict (a state dict "
                         f"or a train.py checkpoint with 'model'/'ema')")
    return obj


def _clean(state_dict: dict, path: PathLike) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint {path}: entry {key!r} is a {type(value).__name__}, expected a tensor")
        for prefix in _STRIP_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_checkpoint(path: PathLike, key: str = "ema") -> Dict[str, torch.Tensor]:
    """Return the model state dict stored at `path` (.pt/.pth or .safetensors).

    key: which weights to take from a train.py checkpoint: "ema" (default, falls back to "model"
    when the file has no EMA) or "model".
    """
    if key not in ("ema", "model"):
        raise ValueError(f"key must be 'ema' or 'model', got {key!r}")
    return _clean(_select(_read(path), key), path)


def _select(obj: dict, key: str) -> dict:
    for k in (key, "model", "state_dict"):
        if isinstance(obj.get(k), dict):
            return obj[k]
    return obj


def infer_config(state_dict: Dict[str, torch.Tensor], num_heads: Optional[int] = None) -> dict:
    """DiT(...) keyword arguments that reproduce `state_dict`'s keys and shapes.

    num_heads cannot be read from shapes; it is taken from the named configuration with the same
    hidden size (S: 6, B: 12, L/XL: 16) unless given. class_dropout_prob is 0.1 (the official
    default) when the label table has a null-class row, else 0.
    """
    try:
        hidden = state_dict["pos_embed"].shape[-1]
        num_patches = state_dict["pos_embed"].shape[1]
        proj = state_dict["x_embedder.proj.weight"]
        table_rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
        out_features = state_dict["final_layer.linear.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a DiT state dict: missing {e.args[0]!r}") from None
    except (AttributeError, IndexError):  # an entry of another rank than a DiT's
        raise ValueError("not a DiT state dict: its embedding tensors have unexpected shapes") from None
    patch, in_channels = proj.shape[-1], proj.shape[1]
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    if num_heads is None:
        heads = {c["hidden_size"]: c["num_heads"] for c in DiT_configs.values()}
        if hidden not in heads:
            raise ValueError(f"cannot infer num_heads for hidden_size {hidden}: pass num_heads=")
        num_heads = heads[hidden]
    if "blocks.0.cross_attn.q.weight" in state_dict:
        block = "cross-attention"
    elif "blocks.0.adaLN_modulation.1.weight" in state_dict:
        block = "adaLN-Zero" if state_dict["blocks.0.adaLN_modulation.1.weight"].shape[0] == 6 * hidden else "adaLN"
    else:
        block = "in-context"
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    out_channels = out_features // (patch * patch)
    # A null-class row can't be told from a real class by shape; the official default (0.1) is assumed.
    return dict(
        input_size=int(round(num_patches ** 0.5)) * patch, patch_size=patch, in_channels=in_channels,
        hidden_size=hidden, depth=depth, num_heads=num_heads,
        mlp_ratio=fc1.shape[0] / hidden if fc1 is not None else 4.0,
        class_dropout_prob=0.1, num_classes=table_rows - 1,
        learn_sigma=out_channels == 2 * in_channels, block=block,
    )


def state_dict_mismatch(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """One line describing why `state_dict` does not load strictly into `model` (None if it does):
    missing and unexpected keys, and shape mismatches (load_state_dict's own message spans lines)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} is {tuple(state_dict[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
              for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]

    def few(items, n=2):
        return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
    parts = ([f"shape mismatch: {few(shapes, 1)}"] if shapes else []) + \
            ([f"missing keys: {few(missing)}"] if missing else []) + \
            ([f"unexpected keys: {few(unexpected)}"] if unexpected else [])
    return "; ".join(parts) or None


def load_state_dict_strict(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], what: str) -> None:
    """model.load_state_dict(state_dict, strict=True), with a mismatch reported as one ValueError line
    that starts with `what` (e.g. "checkpoint PATH")."""
    problem = state_dict_mismatch(model, state_dict)
    if problem:
        raise ValueError(f"{what} does not fit the model: {problem}")
    model.load_state_dict(state_dict, strict=True)


def _config_from_args(args) -> Optional[dict]:
    """Model configuration from an official train.py checkpoint's argparse args."""
    name = getattr(args, "model", None)
    if name not in DiT_configs or not hasattr(args, "image_size"):
        return None
    return dict(DiT_configs[name], input_size=args.image_size // 8,
                num_classes=getattr(args, "num_classes", 1000))


def download_pretrained(name: str, root: Optional[PathLike] = None) -> Path:
    """Download a published checkpoint (once) and return its local path."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained checkpoint {name!r}; known: {sorted(PRETRAINED)}")
    root = Path(root) if root is not None else cache_dir()
    path = root / name
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        torch.hub.download_url_to_file(PRETRAINED_URL.format(name), str(tmp), progress=True)
        os.replace(tmp, path)
    return path


def from_pretrained(name_or_path: PathLike, key: str = "ema", **overrides) -> DiT:
    """Build a DiT and load its weights with strict=True; returns it in eval mode.

    name_or_path: a local checkpoint file (any layout load_checkpoint reads), or the name of a
    published checkpoint ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt", with or without ".pt"),
    downloaded to cache_dir() on first use. overrides: DiT(...) arguments that take precedence over
    the configuration found in (or inferred from) the checkpoint.
    """
    path = Path(name_or_path)
    config = None
    if not path.is_file():
        name = path.name if path.name.endswith(".pt") else path.name + ".pt"
        if name not in PRETRAINED:
            raise FileNotFoundError(f"no checkpoint file at {name_or_path!r} and no published checkpoint of "
                                    f"that name (known: {sorted(PRETRAINED)})")
        model_name, image_size = PRETRAINED[name]
        path = download_pretrained(name)
        config = dict(DiT_configs[model_name], input_size=image_size // 8)
    raw = _read(path)
    state_dict = _clean(_select(raw, key), path)
    config = config or raw.get("config") or _config_from_args(raw.get("args"))
    if config is None:
        try:
            config = infer_config(state_dict, overrides.get("num_heads"))
        except ValueError as e:
            raise ValueError(f"checkpoint {path}: {e}") from None
    config = {**config, **overrides}
    try:
        model = DiT(**config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: its model configuration is invalid: {_first_line(e)}") from None
    load_state_dict_strict(model, state_dict, f"checkpoint {path}")
    return model.eval()


def save_checkpoint(model: DiT, path: PathLike) -> None:
    """Write `model`'s weights atomically: safetensors (with the configuration in its metadata) when
    `path` ends in .safetensors, else a torch plain state dict (the published checkpoints' layout).
    A failed write raises OSError naming the file and the reason, and leaves no temporary file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"save_checkpoint: {path} is a directory; pass a file path such as "
                                f"{path / 'model.safetensors'}")
    tmp = path.with_name(path.name + ".tmp")
    # copies: the adaLN weights are views into one buffer, which older safetensors releases refuse, and
    # torch.save would store as one shared storage instead of the published one-tensor-each layout
    state_dict = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state_dict, str(tmp), metadata={_CONFIG_KEY: json.dumps(model.config)})
        else:
            with open(tmp, "wb") as f:  # a file object: a full disk surfaces as OSError, not a zip-writer error
                torch.save(state_dict, f)
        os.replace(tmp, path)
    except Exception as e:
        raise OSError(f"cannot write checkpoint {path}: {io_reason(e)}") from None
    finally:
        tmp.unlink(missing_ok=True)

