"""Diffusion over continuous image latents (the Transfusion setting): noise schedules, the forward process
and the regression targets. Library pieces for the diffusion objective; the trainer does not run it yet.

Time t is in [0, 1]: t = 0 is the clean latent, t = 1 pure noise.
- "ddpm_cosine": x_t = sqrt(abar(t)) x_0 + sqrt(1 - abar(t)) eps with Nichol & Dhariwal's cosine abar
  (abar(0) = 1, abar(1) = 0); the model predicts eps (Transfusion).
- "flow": rectified flow, x_t = (1 - t) x_0 + t eps; the model predicts the velocity eps - x_0.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Schedule = Literal["ddpm_cosine", "flow"]
COSINE_OFFSET = 0.008  # Nichol & Dhariwal's s: keeps beta small near t = 0


def cosine_alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """abar(t) = f(t) / f(0), f(t) = cos^2(((t + s) / (1 + s)) * pi / 2); exactly 1 at t = 0 and 0 at t = 1."""
    f = lambda u: torch.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    return (f(t) / f(torch.zeros_like(t))).clamp(0.0, 1.0)


def mixing(t: torch.Tensor, schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(signal, noise) coefficients at time t: x_t = signal * x_0 + noise * eps."""
    if schedule == "ddpm_cosine":
        abar = cosine_alpha_bar(t)
        return abar.sqrt(), (1 - abar).sqrt()
    if schedule == "flow":
        return 1 - t, t
    raise ValueError(f"unknown schedule {schedule!r}; choose 'ddpm_cosine' or 'flow'")


def _per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def add_noise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """The forward process for a batch of latents x0 (N, ...) at per-sample times t (N,)."""
    signal, sigma = mixing(t, schedule)
    return _per_sample(signal, x0) * x0 + _per_sample(sigma, x0) * noise


def target(x0: torch.Tensor, noise: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """What the model regresses: the noise (DDPM) or the velocity noise - x0 (rectified flow)."""
    return noise if schedule == "ddpm_cosine" else noise - x0


def predicted_clean(x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """x0 recovered from x_t and the model's prediction (for sampling and for checking a model)."""
    if schedule == "flow":
        return x_t - _per_sample(t, x_t) * prediction
    signal, sigma = mixing(t, schedule)
    return (x_t - _per_sample(sigma, x_t) * prediction) / _per_sample(signal, x_t).clamp(min=1e-4)
