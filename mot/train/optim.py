"""AdamW with weight-decay groups, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from mot.config import TrainConfig
from mot.model.pattention import TowerPattention
from mot.model.routing import TowerLinear


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the projection and head matrices; leave norms and embeddings alone.

    Decided by the owning module, not by shape: a per-tower norm gain is 2-D (towers, dim) but is no matrix.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            is_matrix = (isinstance(module, TowerLinear | nn.Linear) and name == "weight") or isinstance(
                module, TowerPattention)  # parameter tokens are the rows of a projection's matrices
            (decay if is_matrix else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = True) -> torch.optim.AdamW:
    """fused: one kernel for all parameters (CPU and CUDA); the multi-tensor path otherwise (FSDP's DTensors)."""
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=fused or None, foreach=None if fused else True,
    )


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based): linear warm-up from lr/warmup to lr over
    warmup_steps, then cosine down to lr * min_lr_ratio at the last step (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, cfg.steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
