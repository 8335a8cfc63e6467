"""Rotary position embeddings (rotate-half form, as in Llama)."""

from __future__ import annotations

import torch
from torch import nn


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 activations, float64 for float64 ones."""
    return torch.promote_types(dtype, torch.float32)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0..max_seq_len-1, read (not recomputed) by every layer.

    Tables held in memory matter on the GPU: computed from positions inside the
    compiled graph, inductor fuses cos/sin into every consumer and recomputes
    them per head (its cost: bench/NOTES.md, "Figures moved out of code comments").
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self._build(torch.float32, None)

    def _build(self, dtype: torch.dtype, device: torch.device | None) -> None:
        exponent = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64) / self.head_dim
        angles = torch.arange(self.max_seq_len, device=device, dtype=torch.float64)[:, None] * self.theta**-exponent
        angles = torch.cat([angles, angles], dim=-1)  # (max_seq_len, head_dim)
        self.register_buffer("cos", angles.cos().to(dtype), persistent=False)
        self.register_buffer("sin", angles.sin().to(dtype), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Casting the model to bf16 must not round the tables: rebuild at float32 (or float64).
        self._build(compute_dtype(self.cos.dtype), self.cos.device)
        return self

    def forward(self, seq_len: int, positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin broadcastable against (B, T, H, head_dim); positions (T,) or (B, T), default 0..T-1."""
        if positions is None:
            return self.cos[:seq_len, None, :], self.sin[:seq_len, None, :]
        return self.cos[positions][..., None, :], self.sin[positions][..., None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) queries or keys; dims i and i + D/2 form a pair. Computed in cos's dtype."""
    xc = x.to(cos.dtype)
    first, second = xc.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (xc * cos + rotated * sin).to(x.dtype)


def apply_rotary_together(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary on queries and keys of the same head size in one set of ops (their heads side by side):
    the same values, in half the kernel launches, which is what an eager decoding step's host time counts."""
    both = apply_rotary(torch.cat([q, k], dim=-2), cos, sin)
    return both.split([q.shape[-2], k.shape[-2]], dim=-2)
