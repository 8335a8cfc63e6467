"""How a diffusion modality's continuous latents enter and leave the transformer (Transfusion setting).

A latent token (C * p * p numbers) is embedded by a linear input projection plus an embedding of its
noise level t, goes through its modality's tower like any token, and is read out of the final hidden state
by a linear output projection into what the schedule regresses (the noise, or the flow velocity).
Transfusion's simplest variant (linear patch projections); its U-Net down/up blocks are not here.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class TimestepEmbedding(nn.Module):
    """t in [0, 1] -> (N, dim): sinusoidal features of 1000 t through a two-layer SiLU MLP (as DiT)."""

    def __init__(self, dim: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def features(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None]
        return torch.cat([angles.cos(), angles.sin()], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t).to(self.mlp[0].weight.dtype))


class LatentProjection(nn.Module):
    """One diffusion modality's input projection, timestep embedding and output projection."""

    def __init__(self, token_dim: int, dim: int):
        super().__init__()
        self.token_dim = token_dim
        self.inp = nn.Linear(token_dim, dim)
        self.time = TimestepEmbedding(dim)
        self.out = nn.Linear(dim, token_dim)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        for linear in (self.inp, self.time.mlp[0], self.time.mlp[2]):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)
        # Zero read-out (DiT): the first prediction is 0, the loss starts at the target's variance.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def embed(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(N, token_dim) noised latents at per-token times t (N,) -> (N, dim)."""
        if latents.shape[-1] != self.token_dim:
            raise ValueError(f"latent tokens must have {self.token_dim} numbers, got {tuple(latents.shape)}")
        return self.inp(latents.to(self.inp.weight.dtype)) + self.time(t)

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(hidden)
