"""The objectives as the trainer sees them, behind one interface: what happens to a loader batch on the host, the
per-modality loss sums and counts of a micro-batch, the scalar that is back-propagated, the loss reported.

    objective = build_objective(cfg.model, cfg.data.tokenizers, vocab, where, loss_fn)
    batch = objective.host_batch(loader_batch).to(device)    # latents swapped in, towers counted on the host
    loss_sum, count = objective.losses(model, batch, objective.mask(batch, flex=True))
    objective.backward_scalar(loss_sum, count, predictions, accum).backward()
    objective.weighted(host_loss_sum, host_count)             # the step's reported loss

`NextToken`: every modality autoregressive. What is back-propagated is sum_m w_m * (loss sum of modality m) /
(predictions per process per step), so with all weights 1 it is the plain token mean of the step.
`Transfusion`: some image modalities by diffusion (latents.py). Per micro-batch, the token mean of the
next-token losses plus, per diffusion modality, its weight times its mean squared error, averaged over the
step's micro-batches (the counts of each vary from batch to batch).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mot.config import ModelConfig
from mot.data.loader import PackedBatch
from mot.flops import attention_pairs
from mot.model.io import ModelInputs
from mot.model.masks import document_block_mask, mixed_block_mask
from mot.objectives.ar import next_token_loss
from mot.objectives.diffusion import add_noise, diffusion_loss
from mot.objectives.latents import LatentBatch, LatentBatcher, load_codecs
from mot.vocab import UnifiedVocab


class NextToken:
    """Next-token cross-entropy for every modality."""

    weighted_is_a_ratio = True  # the reported loss is sum_m w_m * sums_m / sum_m counts_m

    def __init__(self, model_cfg: ModelConfig, loss_fn: Callable = next_token_loss):
        self.n_modalities = len(model_cfg.modalities)
        self.loss_weights = torch.tensor([m.loss_weight for m in model_cfg.modalities])
        self.loss_fn = loss_fn

    def to(self, device: torch.device) -> NextToken:
        self.loss_weights = self.loss_weights.to(device)
        return self

    def host_batch(self, batch: PackedBatch) -> PackedBatch | LatentBatch:
        """The loader's batch ready to move: its tokens per tower counted here, so the blocks never read them back
        from the GPU."""
        return batch.counted(self.n_modalities) if batch.modality.device.type == "cpu" else batch

    def mask(self, batch: PackedBatch, flex: bool):
        return document_block_mask(batch.document_ids) if flex else batch.attn_mask()

    def attention_pairs(self, batch: PackedBatch) -> int:
        """(query, key) pairs the batch's mask allows, counted on the host (FLOPs)."""
        return attention_pairs(batch.document_ids)

    def losses(self, model, batch: PackedBatch, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-modality loss sums and prediction counts of one micro-batch."""
        inputs = ModelInputs(batch.tokens, batch.modality, batch.positions, mask, tower_counts=batch.tower_counts)
        logits = model(inputs).logits
        _, loss_sum, count = self.loss_fn(logits, batch.tokens, batch.modality, self.n_modalities)
        return loss_sum, count

    def backward_scalar(self, loss_sum: torch.Tensor, count: torch.Tensor, predictions: int,
                        accum: int) -> torch.Tensor:
        return (loss_sum * self.loss_weights).sum() / predictions

    def weighted(self, loss_sum: torch.Tensor, count: torch.Tensor) -> float:
        """The weighted loss of summed host totals, as reported."""
        return float((loss_sum * self.loss_weights.cpu()).sum() / count.sum().clamp(min=1))


class Transfusion(NextToken):
    """Next-token losses for the AR modalities, denoising losses for the diffusion ones."""

    weighted_is_a_ratio = False  # a token mean plus per-modality means

    def __init__(self, model_cfg: ModelConfig, batcher: LatentBatcher, loss_fn: Callable = next_token_loss):
        super().__init__(model_cfg, loss_fn)
        self.batcher = batcher
        self.diffusion = {i: m for i, m in enumerate(model_cfg.modalities) if m.is_diffusion}
        self.is_diffusion = torch.tensor([m.is_diffusion for m in model_cfg.modalities])

    def to(self, device: torch.device) -> Transfusion:
        super().to(device)
        self.is_diffusion = self.is_diffusion.to(device)
        return self

    def host_batch(self, batch: PackedBatch) -> LatentBatch:
        return super().host_batch(self.batcher(batch))

    def mask(self, batch: LatentBatch, flex: bool):
        return mixed_block_mask(batch.document_ids, batch.span_ids) if flex else batch.attn_mask()

    def attention_pairs(self, batch: LatentBatch) -> int:
        return attention_pairs(batch.document_ids, batch.span_ids)

    def losses(self, model, batch: LatentBatch, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """For a diffusion modality: the squared error summed over its latent tokens, and their count."""
        noised, times, clean, noise = {}, {}, {}, {}
        for m, x0 in batch.latents.items():  # (images, tokens, token_dim): each image at its own time
            t = torch.rand(x0.shape[0], device=x0.device)
            noise[m] = torch.randn_like(x0)
            noised[m] = add_noise(x0, t, noise[m], self.diffusion[m].schedule).flatten(0, 1)
            times[m] = t.repeat_interleave(x0.shape[1])
            clean[m], noise[m] = x0.flatten(0, 1), noise[m].flatten(0, 1)
        out = model(ModelInputs(batch.tokens, batch.modality, batch.positions, mask, noised, times, batch.tower_counts))
        logits = out.logits
        _, loss_sum, count = self.loss_fn(logits, batch.tokens, batch.modality, self.n_modalities, batch.target_mask)
        extra_sum, extra_count = torch.zeros_like(loss_sum), torch.zeros_like(count)
        for m, prediction in out.latent_predictions.items():
            s, c = diffusion_loss(prediction, clean[m], noise[m], self.diffusion[m].schedule)
            extra_sum[m], extra_count[m] = s, c
        return loss_sum + extra_sum, count + extra_count

    def combined(self, loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """The token mean of the next-token losses plus, per diffusion modality, its loss weight times its mean
        squared error."""
        weights, diffusion = self.loss_weights, self.is_diffusion
        if loss_sum.device != weights.device:  # host totals
            weights, diffusion = weights.cpu(), diffusion.cpu()
        ar_sum = torch.where(diffusion, 0.0, loss_sum * weights).sum()
        ar = ar_sum / torch.where(diffusion, 0.0, count).sum().clamp(min=1)
        return ar + torch.where(diffusion, loss_sum * weights / count.clamp(min=1), 0.0).sum()

    def backward_scalar(self, loss_sum: torch.Tensor, count: torch.Tensor, predictions: int,
                        accum: int) -> torch.Tensor:
        return self.combined(loss_sum, count) / accum

    def weighted(self, loss_sum: torch.Tensor, count: torch.Tensor) -> float:
        return float(self.combined(loss_sum.float(), count.float()))


def build_objective(model_cfg: ModelConfig, tokenizers: str | Path, vocab: UnifiedVocab, where: str,
                    loss_fn: Callable = next_token_loss) -> NextToken:
    """Transfusion when a modality's objective is diffusion (its latent codecs loaded from the tokenizers),
    else NextToken."""
    if not any(m.is_diffusion for m in model_cfg.modalities):
        return NextToken(model_cfg, loss_fn)
    batcher = LatentBatcher(vocab, model_cfg.modalities, load_codecs(model_cfg, tokenizers, where))
    return Transfusion(model_cfg, batcher, loss_fn)
