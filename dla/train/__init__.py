"""Training: configs (:mod:`dla.train.config`), the loop (:mod:`dla.train.loop`), checkpoints,
metrics and multi-process setup."""

from dla.train.config import OptimConfig, TrainConfig, load_config
from dla.train.loop import build_model, lm_loss, train

__all__ = ["OptimConfig", "TrainConfig", "build_model", "lm_loss", "load_config", "train"]
