"""Training DiTs: `python -m dit_fast.train` (or `dit-fast train`), and the same from Python.

    from dit_fast.train import make_args, train
    summary = train(make_args(dataset="digits", model="DiT-S/4", max_steps=100, results_dir="run"))

See `python -m dit_fast.train --help` for every argument.
"""
from .args import build_parser, make_args, parse_args
from .data import (DigitsDataset, ImageFolder, LatentDataset, SampleKey, TrainSampler, center_crop_arr,
                   preprocess)
from .ema import make_ema, update_ema
from .trainer import TrainingError, build_model_config, main, make_optimizer, read_metrics, train

__all__ = ["DigitsDataset", "ImageFolder", "LatentDataset", "SampleKey", "TrainSampler", "TrainingError",
           "build_model_config", "build_parser", "center_crop_arr", "main", "make_args", "make_ema", "make_optimizer",
           "parse_args", "preprocess", "read_metrics", "train", "update_ema"]
