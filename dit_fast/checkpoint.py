"""Loading and saving DiT checkpoints.

Reads every layout a DiT user meets:
- the published plain state dicts (`DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt`);
- the official `train.py` checkpoints, a dict with `model`, `ema`, `opt`, `args` (the EMA weights
  are taken by default, as the official `sample.py` does);
- safetensors files (ours carry the model configuration in their metadata);
- state dicts saved from a DDP-wrapped (`module.`) or `torch.compile`d (`_orig_mod.`) model.
"""
import argparse
import json
import os
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


def _read(path: PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
        out = {"model": tensors}
        if _CONFIG_KEY in metadata:
            out["config"] = json.loads(metadata[_CONFIG_KEY])
        return out
    # weights_only loading, with the argparse.Namespace that official train.py checkpoints hold.
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
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
        config = infer_config(state_dict, overrides.get("num_heads"))
    config = {**config, **overrides}
    model = DiT(**config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def save_checkpoint(model: DiT, path: PathLike) -> None:
    """Write `model`'s weights atomically: safetensors (with the configuration in its metadata) when
    `path` ends in .safetensors, else a torch plain state dict (the published checkpoints' layout)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    # copies: the adaLN weights are views into one buffer, which older safetensors releases refuse, and
    # torch.save would store as one shared storage instead of the published one-tensor-each layout
    state_dict = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(tmp), metadata={_CONFIG_KEY: json.dumps(model.config)})
    else:
        torch.save(state_dict, tmp)
    os.replace(tmp, path)

