"""AdamW with weight-decay groups, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from mot.config import TrainConfig
from mot.model.pattention import TowerPattention
from mot.model.routing import TowerLinear
from mot.train.freeze import Freezer
from mot.train.master_weights import MasterWeightAdamW


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


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = True, master_weights: bool = False,
                    freezer: Freezer | None = None) -> torch.optim.Optimizer:
    """fused: one kernel for all parameters (CPU and CUDA, plain tensors or FSDP's DTensors); the multi-tensor
    path otherwise. master_weights: the model's matmul weights become bf16 and the optimizer keeps their fp32
    masters (mot/train/master_weights.py); fused is then implied. freezer: `train.freeze` (its frozen
    parameters are in no group; partly frozen ones get groups whose decay it applies itself)."""
    groups = parameter_groups(model, cfg.weight_decay)
    if freezer is not None:
        groups = freezer.take_weight_decay(groups)
    if master_weights:
        return MasterWeightAdamW(model, groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused or None, foreach=None if fused else True)


def clip_gradients(optimizer: torch.optim.Optimizer, parameters, max_norm: float) -> torch.Tensor:
    """Total gradient norm of `parameters` (before clipping); the gradients are clipped to `max_norm` by the
    next `optimizer.step()`.

    A fused AdamW (and MasterWeightAdamW) clips inside its own kernel: its `grad_scale` (the protocol torch's
    GradScaler uses) divides every gradient as it is read, which saves a separate pass over all gradients
    (its saving: bench/NOTES.md). Anything else (FSDP's DTensor
    gradients) is clipped in place as `torch.nn.utils.clip_grad_norm_` does. Either way:
    grad * min(1, max_norm / (norm + 1e-6)).
    """
    if isinstance(optimizer, MasterWeightAdamW):  # its own gradients: fp32 sums over stashed micro-batches
        grads = optimizer.gradients()
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        # Norms in fp32 also of bf16 gradients: the value the fp32 gradients of autocast would give.
        norms = [n for gs in by_device.values() for n in torch._foreach_norm(gs, 2, dtype=torch.float32)]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0).float()
        return norm
    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    norm = torch.nn.utils.get_total_norm(grads)
    fused = optimizer.defaults.get("fused") and not any(hasattr(g, "full_tensor") for g in grads)
    if not fused:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
        return norm
    # Set on every step, so a skipped step never leaves a stale scale behind.
    optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0).float()
    return norm


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
