"""Sampling an image span under the diffusion objective, inside the sequence (Transfusion setting).

After <boi> the span's latent tokens start as noise and are denoised over N steps (ancestral DDPM or
DDIM for the cosine schedule, Euler for flow), every step a forward pass of the span that attends to the prefix and,
bidirectionally, to the whole span. With guidance, an unconditional stream (the same span after only
<bod> <boi>) runs beside it and the predictions mix as uncond + scale * (cond - uncond).

`denoise_in_cache` is that sampler over the generation loop's KV cache (mot.generate.loop): one block of n
slots per span, rewritten in place by every denoising pass (`advance=False`), then written once more with the
clean latents at t = 0 (`advance=True`), which later tokens attend to. `sample_span_reference` recomputes the
whole sequence at every step: slow and simple, the oracle for the cached path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mot.generate.decoder import CachedDecoder
from mot.model.io import ModelInputs
from mot.model.masks import mixed_mask
from mot.model.transformer import MoTTransformer
from mot.objectives.diffusion import Schedule, denoise_step, sample, sampling_times

if TYPE_CHECKING:
    from mot.objectives.latents import LatentCodec

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, sample) over the generator's seeds


def guided(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """cond + (scale - 1) * (cond - uncond): scale 1 is exactly the conditional prediction."""
    if uncond is None or scale == 1:
        return cond
    return cond + (scale - 1) * (cond - uncond)


@torch.no_grad()
def sample_span_reference(
    model: MoTTransformer,
    prefix: list[int],
    modality: int,
    steps: int,
    noise: torch.Tensor,
    guidance_scale: float = 1.0,
    clip: float | None = None,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Latent tokens (n, token_dim) of the image span that follows `prefix` (unified ids ending with <boi>).

    noise: (n, token_dim), the span at t = 1. clip bounds the predicted clean latent (the codec's `bound`);
    eta (DDPM schedule only) is 1 for ancestral sampling, 0 for deterministic DDIM; the generator draws
    the fresh noise eta > 0 adds. The sequence is recomputed in full at every step.
    """
    vocab, cfg = model.vocab, model.cfg.modalities[modality]
    n = noise.shape[0]
    device = model.embed.weight.device
    placeholder = vocab.ranges[modality].start
    streams = [prefix]
    if guidance_scale != 1:
        streams.append([vocab.special_id("<bod>"), vocab.special_id("<boi>")])

    def run(ids: list[int], x: torch.Tensor, t: float) -> torch.Tensor:
        tokens = torch.tensor([ids + [placeholder] * n], device=device)
        span = torch.full_like(tokens, -1)
        span[0, len(ids):] = 0
        mask = mixed_mask(torch.zeros_like(tokens), span)
        times = torch.full((n,), t, device=device)
        inputs = ModelInputs(tokens, attn_mask=mask, latents={modality: x.to(device)}, timesteps={modality: times})
        return model(inputs).latent_predictions[modality].float()

    def predict(x: torch.Tensor, t: float) -> torch.Tensor:
        outs = [run(ids, x, t) for ids in streams]
        return guided(outs[0], outs[1] if len(outs) > 1 else None, guidance_scale)

    return sample(predict, noise.to(device), steps, cfg.schedule, clip, eta, generator)


# ---------------------------------------------------------------- the KV-cached sampler (mot.generate.loop)


@dataclass(frozen=True)
class SpanSpec:
    """How the loop samples the spans of one diffusion modality."""

    modality: int  # index of the modality (its tower and latent projections)
    placeholder: int  # the id every latent token carries: the modality's first id
    tokens: int  # n latent tokens per span
    token_dim: int
    schedule: Schedule
    steps: int  # denoising passes per span
    eta: float = 1.0  # ddpm_cosine: 1 ancestral, 0 deterministic DDIM
    clip: float | None = None  # bound on the predicted clean latents (the codec's `bound`)
    guidance_scale: float = 1.0

    @classmethod
    def for_model(cls, model: MoTTransformer, modality: int, steps: int, eta: float = 1.0, clip: float | None = None,
                  guidance_scale: float = 1.0) -> SpanSpec:
        cfg = model.cfg.modalities[modality]
        return cls(modality, model.vocab.ranges[modality].start, cfg.latent_tokens, cfg.patch_dim, cfg.schedule,
                   steps, eta, clip, guidance_scale)


def span_generator(seed: int, sample: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The noise stream of one sample's image spans (its starting noise, then the fresh noise of ancestral steps).

    Its own stream per sample: an image depends on the seed and the sample's index, not on what the other rows
    of the batch do, nor on the draws of the token sampler."""
    return torch.Generator(device=device).manual_seed((seed * _SEED_MIX + sample + 1) % (1 << 63))


@torch.no_grad()
def denoise_in_cache(
    decoder: CachedDecoder,
    spec: SpanSpec,
    positions: torch.Tensor,
    rows: torch.Tensor,
    noise: torch.Tensor,
    generators: list[torch.Generator],
    uncond_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample k spans at once in a block of n new cache slots: (logits (B, V) after the block, clean (k, n, dim)).

    rows: (k,) the batch rows that hold a span (the others get invisible <pad> slots); uncond_rows: (k,) their
    unconditional rows (guidance), fed the same latents. positions: (B, n) rotary positions of the block.
    noise: (k, n, dim), the spans at t = 1; generators[j]: fresh noise of span j (eta > 0).
    """
    batch, n = positions.shape
    span_rows = rows if uncond_rows is None else torch.cat([rows, uncond_rows])
    in_span = torch.zeros(batch, dtype=torch.bool, device=positions.device)
    in_span[span_rows] = True
    tokens = torch.where(in_span[:, None], spec.placeholder, decoder.pad).expand(batch, n)
    visible = in_span[:, None].expand(batch, n)
    k = rows.shape[0]

    def run(x: torch.Tensor, t: float, advance: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # The predictions come back in row-major order: the conditional rows, then the unconditional ones
        # (sorted: every unconditional row comes after every conditional one), as the latents go in.
        z = x if uncond_rows is None else torch.cat([x, x])
        times = torch.full((z.shape[0] * n,), t, device=positions.device)
        logits, predictions = decoder.span_pass(tokens, positions, visible, {spec.modality: z.flatten(0, 1)},
                                                {spec.modality: times}, advance)
        return logits, predictions[spec.modality].float().view(-1, n, spec.token_dim)

    x = noise.float()
    times = sampling_times(spec.steps).tolist()
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        _, prediction = run(x, t, advance=False)  # the same slots again at the next step
        prediction = guided(prediction[:k], None if uncond_rows is None else prediction[k:], spec.guidance_scale)
        # One span at a time: each draws its fresh noise from its own sample's stream.
        x = torch.stack([denoise_step(x[j], t, t_next, prediction[j], spec.schedule, spec.clip, spec.eta,
                                      generators[j]) for j in range(k)])
    logits, _ = run(x, 0.0, advance=True)  # the clean span, kept for the tokens after it
    return logits, x


def load_span_codecs(model: MoTTransformer, tokenizers: str | Path | None, where: str = "checkpoint"
                     ) -> dict[str, LatentCodec]:
    """The latent codec of every diffusion modality, by modality name ({} when the model has none)."""
    from mot.objectives.latents import load_codecs

    if not model.diffusion_modalities:
        return {}
    codecs = load_codecs(model.cfg, tokenizers or "", where)
    return {model.cfg.modalities[i].name: codec for i, codec in codecs.items()}
