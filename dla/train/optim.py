"""AdamW with decoupled weight decay on weight matrices only, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dla.train.config import OptimConfig


def weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters that get weight decay: matrices (projections, embeddings), not norms, biases, or
    parameters their module flags ``_no_weight_decay`` (decay rates, λ's label scale, ...).

    Decided by name before the model is sharded, because FSDP replaces the parameter objects
    (and with them the ``_no_weight_decay`` flags) but keeps the names."""
    return {name for name, p in model.named_parameters()
            if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) and "norm" not in name.lower()}


def build_optimizer(model: nn.Module, decay_names: set[str], cfg: OptimConfig) -> torch.optim.AdamW:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if n in decay_names], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in params if n not in decay_names], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The learning rate of (0-based) ``step`` relative to ``cfg.lr``: linear warmup over
    ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = max(total_steps - 1 - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
