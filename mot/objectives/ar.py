"""Autoregressive next-token cross-entropy, reported per modality of the predicted token."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    modality: torch.Tensor,
    n_modalities: int,
    target_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss over all predicted tokens, and per modality the loss sum and token count.

    logits (B, T, V) predict tokens[:, 1:]; the modality of a prediction is that of its target.
    target_mask: (B, T) bool, which tokens count as targets (default all; the diffusion setting leaves out
    latent tokens, padding and the <eoi> after an image).
    Returns (mean_loss, loss_sum[M], count[M]) so that callers can weight and average across steps.
    """
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = tokens[:, 1:].reshape(-1)
    target_modality = modality[:, 1:].reshape(-1)
    per_token = F.cross_entropy(pred, target, reduction="none")
    weight = torch.ones_like(per_token) if target_mask is None else target_mask[:, 1:].reshape(-1).to(per_token)
    per_token = per_token * weight
    loss_sum = torch.zeros(n_modalities, device=logits.device).index_add_(0, target_modality, per_token)
    # index_add rather than bincount: a static output shape, so the loss compiles into one graph.
    count = torch.zeros(n_modalities, device=logits.device).index_add_(0, target_modality, weight)
    return per_token.sum() / weight.sum().clamp(min=1), loss_sum, count
