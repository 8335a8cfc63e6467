"""What the model takes and what it gives back: one `ModelInputs` in, one `ModelOutput` out.

The same inputs serve the full forward (training, evaluation) and the cached path (generation); the
diffusion fields stay empty for a model, or a batch, without continuous latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class ModelInputs:
    """A batch of B rows of T tokens, as the model reads it.

    tokens: (B, T) ids over the unified vocabulary.
    modality: (B, T) tower index per token; default from the id ranges.
    positions: (B, T) rotary positions (restart per packed document); default 0..T-1 (cached: the slots).
    attn_mask: boolean (B, 1, T, T), True = may attend, or a flex BlockMask; default causal. Not on the
        cached path, where the cache makes the mask.
    latents, timesteps: per diffusion modality m, the noised latent tokens (N_m, token_dim) and their times
        (N_m,) of the N_m positions where modality == m, in row-major order.
    tower_counts: the tokens per modality, counted on the host (`PackedBatch.counted`; a tuple of ints,
        which DDP and FSDP leave on the host): on CUDA the blocks then run one cuBLAS GEMM per tower
        instead of a grouped matmul; where every token sits in one tower, the route skips its sort (a decoding
        step).
    """

    tokens: torch.Tensor
    modality: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None
    latents: dict[int, torch.Tensor] | None = None
    timesteps: dict[int, torch.Tensor] | None = None
    tower_counts: Sequence[int] | torch.Tensor | None = None


class ModelOutput(NamedTuple):
    """Logits (B, T, V) over the unified vocabulary, and per diffusion modality of the inputs' latents its
    predictions (N_m, token_dim) in the order of those latents (empty without latents).

    A named tuple, not a dataclass: accelerate's fp32 cast of a mixed-precision forward's outputs walks
    tuples and dicts but passes a dataclass through untouched, in bf16.
    """

    logits: torch.Tensor
    latent_predictions: dict[int, torch.Tensor]
