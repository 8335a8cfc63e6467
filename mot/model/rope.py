"""Rotary position embeddings (rotate-half form, as in Llama).

The tables are computed per call from the positions: no buffers, so casting the
model to bf16 cannot round them, and packed documents can restart positions.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 activations, float64 for float64 ones."""
    return torch.promote_types(dtype, torch.float32)


def rotary_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (..., 1, head_dim) for integer positions (...,), broadcastable over heads."""
    dtype = compute_dtype(dtype)
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim
    angles = positions.to(dtype)[..., None] * theta**-exponent
    angles = torch.cat([angles, angles], dim=-1)[..., None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) queries or keys; dims i and i + D/2 form a pair."""
    xc = x.to(cos.dtype)
    first, second = xc.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (xc * cos + rotated * sin).to(x.dtype)
