"""Diffusion over continuous image latents (the Transfusion setting): noise schedules, the forward process
the regression targets and loss, and the samplers (DDIM/DDPM for the DDPM schedule, Euler for flow).

Time t is in [0, 1]: t = 0 is the clean latent, t = 1 pure noise.
- "ddpm_cosine": x_t = sqrt(abar(t)) x_0 + sqrt(1 - abar(t)) eps with Nichol & Dhariwal's cosine abar
  (abar(0) = 1, abar(1) = 0); the model predicts eps (Transfusion).
- "flow": rectified flow, x_t = (1 - t) x_0 + t eps; the model predicts the velocity eps - x_0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


def diffusion_loss(
    prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, schedule: Schedule
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token regression loss: (sum over tokens of the mean squared error over a token's numbers, tokens).

    prediction, x0, noise: (N, token_dim). The mean is taken in float32 whatever the prediction's dtype.
    """
    per_token = (prediction.float() - target(x0, noise, schedule).float()).pow(2).mean(-1)
    return per_token.sum(), torch.tensor(float(per_token.numel()), device=prediction.device)


def sampling_times(steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """steps + 1 times from 1 (pure noise) down to 0 (clean), evenly spaced."""
    if steps <= 0:
        raise ValueError(f"diffusion sampling needs at least one step, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device)


def denoise_step(
    x_t: torch.Tensor, t: float, t_next: float, prediction: torch.Tensor, schedule: Schedule,
    clip: float | None = None, eta: float = 0.0, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x at t_next < t from x at t and the model's prediction there.

    flow: an Euler step along the predicted velocity, x + (t_next - t) v (eta is not used).
    ddpm_cosine: the DDIM family. x0 comes from the predicted noise (clamped to [-clip, clip] when clip is
    set: near t = 1 the signal vanishes and x0 is undetermined), the noise is re-derived from that x0, and
    x' = a' x0 + sqrt(s'^2 - c^2) eps + c z with c = eta * sqrt(s'^2 / s^2 * (1 - a^2 / a'^2)), z fresh noise.
    eta = 0 is deterministic DDIM; eta = 1 is the ancestral DDPM posterior, which forgives the model's
    errors at high noise instead of carrying them to t = 0 (the reason it is the default for sampling).
    """
    if schedule == "flow":
        return x_t + (t_next - t) * prediction.to(x_t.dtype)
    tt = torch.full((x_t.shape[0],), t, device=x_t.device)
    x0 = predicted_clean(x_t, tt, prediction.to(x_t.dtype), schedule)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    signal, sigma = mixing(tt, schedule)
    eps = (x_t - _per_sample(signal, x_t) * x0) / _per_sample(sigma, x_t).clamp(min=1e-8)
    signal_next, sigma_next = mixing(torch.full_like(tt, t_next), schedule)
    a, s, a2, s2 = signal[0].item(), sigma[0].item(), signal_next[0].item(), sigma_next[0].item()
    fresh = 0.0
    if eta > 0 and s2 > 0:
        fresh = min(eta * math.sqrt(s2**2 / max(s**2, 1e-12) * max(1 - a**2 / max(a2**2, 1e-12), 0.0)), s2)
    x_next = a2 * x0 + math.sqrt(max(s2**2 - fresh**2, 0.0)) * eps
    if fresh > 0:
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device if generator is None else generator.device)
        x_next = x_next + fresh * z.to(x_t.device, x_t.dtype)
    return x_next


def sample(
    predict: Callable[[torch.Tensor, float], torch.Tensor],
    noise: torch.Tensor,
    steps: int,
    schedule: Schedule,
    clip: float | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run the sampler from `noise` (x at t = 1): `predict(x_t, t)` returns the model's prediction (guidance
    mixed in by the caller). Returns x at t = 0. eta and generator: see `denoise_step` (DDPM schedule only)."""
    times = sampling_times(steps).tolist()
    x = noise.float()
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        x = denoise_step(x, t, t_next, predict(x, t), schedule, clip, eta, generator)
    return x
