"""Continuous image latents for the diffusion objective (Transfusion setting).

An image is stored in the shards as its VQGAN codes (one shard format for both objectives). For a
diffusion modality the trainer swaps each image span of codes for latent tokens:

    codes (h*w,) -> codebook vectors (h, w, C) -> normalised per channel -> patches of p x p cells
    -> (h/p * w/p) tokens of C * p * p numbers

`LatentCodec` does that and its inverse (for the VQGAN decoder); `LatentBatcher` rewrites a packed batch:
every complete image span becomes its latent tokens (placeholder id = the modality's first id, a span id
for the bidirectional mask), a span cut by the sequence boundary is dropped (its codes cannot make a whole
latent grid), and each row is padded back to its length with <pad> tokens in a document of their own.
With patch_size 1 and no cut spans the rows keep their length and positions exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from mot.config import ConfigError, ModalityConfig, ModelConfig
from mot.data.loader import count_towers
from mot.model.masks import mixed_mask
from mot.vocab import UnifiedVocab


class LatentCodec:
    """VQGAN codes <-> normalised, patchified latent tokens of one diffusion modality."""

    def __init__(self, codebook: torch.Tensor, grid: int, patch: int):
        if codebook.dim() != 2:
            raise ValueError(f"codebook must be (codes, channels), got {tuple(codebook.shape)}")
        if grid % patch:
            raise ValueError(f"patch size {patch} does not divide the latent grid {grid}")
        self.codebook = codebook.detach().float().cpu()
        # Per-channel statistics of the codebook vectors: the model sees latents of unit scale, whatever the
        # VQGAN's (Transfusion scales its VAE latents the same way).
        self.mean = self.codebook.mean(0)
        self.std = self.codebook.std(0).clamp_min(1e-6)
        self.grid, self.patch = grid, patch

    @classmethod
    def for_modality(cls, codebook: torch.Tensor, modality: ModalityConfig) -> LatentCodec:
        if codebook.shape[1] != modality.latent_channels:
            raise ValueError(f"modality {modality.name!r}: latent_channels = {modality.latent_channels} but the "
                             f"tokenizer's codebook vectors have {codebook.shape[1]} channels")
        if codebook.shape[0] != modality.vocab_size:
            raise ValueError(f"modality {modality.name!r}: vocab_size = {modality.vocab_size} but the tokenizer's "
                             f"codebook holds {codebook.shape[0]} codes")
        return cls(codebook, modality.latent_grid, modality.patch_size)

    @property
    def bound(self) -> float:
        """The largest |value| of a normalised codebook vector: every clean latent lies within it, so the
        sampler may clamp its estimate of the clean latents there (what pixel DDPMs do with [-1, 1])."""
        return float(((self.codebook - self.mean) / self.std).abs().max())

    @property
    def channels(self) -> int:
        return self.codebook.shape[1]

    @property
    def tokens_per_image(self) -> int:
        return (self.grid // self.patch) ** 2

    @property
    def token_dim(self) -> int:
        return self.channels * self.patch**2

    def codes_to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """(S, grid*grid) local codes, row-major -> (S, tokens_per_image, token_dim) normalised latent tokens."""
        z = (self.codebook[codes.cpu()] - self.mean) / self.std  # (S, h*w, C)
        z = z.view(codes.shape[0], self.grid, self.grid, self.channels)
        return rearrange(z, "s (h p1) (w p2) c -> s (h w) (p1 p2 c)", p1=self.patch, p2=self.patch)

    def tokens_to_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """(S, tokens_per_image, token_dim) -> (S, C, grid, grid) latents in the VQGAN's own scale."""
        side = self.grid // self.patch
        z = rearrange(tokens.float().cpu(), "s (h w) (p1 p2 c) -> s (h p1) (w p2) c", h=side, w=side,
                      p1=self.patch, p2=self.patch)
        return (z * self.std + self.mean).permute(0, 3, 1, 2).contiguous()

    def nearest_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """(S, tokens_per_image, token_dim) -> (S, grid*grid) the nearest codebook entries (for inspection)."""
        z = self.tokens_to_latents(tokens).permute(0, 2, 3, 1).reshape(tokens.shape[0], -1, self.channels)
        return torch.cdist(z, self.codebook.expand(z.shape[0], -1, -1)).argmin(-1)


def load_codecs(model: ModelConfig, tokenizers: str | Path, where: str = "recipe") -> dict[int, LatentCodec]:
    """A codec per diffusion modality, from the VQGAN in `tokenizers/<modality name>`."""
    from mot.tokenize.image import ImageTokenizer

    codecs = {}
    for index, modality in enumerate(model.modalities):
        if not modality.is_diffusion:
            continue
        folder = Path(tokenizers) / modality.name if tokenizers else None
        if folder is None or not folder.is_dir():
            raise ConfigError(f"{where}: the diffusion modality {modality.name!r} needs its VQGAN's codebook: "
                              f"set data.tokenizers to a folder holding {modality.name}/ (got {tokenizers!r})")
        tokenizer = ImageTokenizer.load(folder)
        grid = tokenizer.grid_size()
        if grid != (modality.latent_grid, modality.latent_grid):
            raise ConfigError(f"{where}: model.modalities.{index}.latent_grid = {modality.latent_grid} but the "
                              f"VQGAN in {folder} makes a {grid[0]}x{grid[1]} grid")
        try:
            codecs[index] = LatentCodec.for_modality(tokenizer.quantize.embedding.weight, modality)
        except ValueError as error:
            raise ConfigError(f"{where}: {error} (VQGAN in {folder})") from None
    return codecs


@dataclass
class LatentBatch:
    """A packed batch whose diffusion-modality image spans hold latent tokens."""

    tokens: torch.Tensor  # (B, T); a latent token carries its modality's first id as a placeholder
    modality: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B, T)
    document_ids: torch.Tensor  # (B, T)
    span_ids: torch.Tensor  # (B, T): -1 outside an image span, k inside the batch's k-th span
    target_mask: torch.Tensor  # (B, T) bool: tokens that are next-token targets (not latents, pads, <eoi>)
    latents: dict[int, torch.Tensor] = field(default_factory=dict)  # modality -> (images, tokens, token_dim)
    tower_counts: tuple[int, ...] | None = None  # as PackedBatch's: tokens per modality, counted on the host

    def attn_mask(self) -> torch.Tensor:
        return mixed_mask(self.document_ids, self.span_ids)

    def counted(self, n_modalities: int) -> LatentBatch:
        """This batch with its tokens per modality counted on the host (call before moving it to the GPU)."""
        return dataclasses.replace(self, tower_counts=count_towers(self.modality, n_modalities))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LatentBatch:
        move = lambda t: t.to(device, non_blocking=non_blocking)
        return LatentBatch(move(self.tokens), move(self.modality), move(self.positions), move(self.document_ids),
                           move(self.span_ids), move(self.target_mask),
                           {m: move(z) for m, z in self.latents.items()}, self.tower_counts)


class LatentBatcher:
    """Rewrites `PackedBatch`es for the diffusion modalities (see the module docstring)."""

    def __init__(self, vocab: UnifiedVocab, modalities: list[ModalityConfig], codecs: dict[int, LatentCodec]):
        self.vocab, self.codecs = vocab, codecs
        self.ranges = {m: vocab.ranges[m] for m in codecs}
        self.codes_per_image = {m: codec.grid**2 for m, codec in codecs.items()}
        self.pad, self.eoi = vocab.special_id("<pad>"), vocab.special_id("<eoi>")
        missing = [modalities[m].name for m in codecs if not modalities[m].is_diffusion]
        if missing:
            raise ValueError(f"latent codecs given for modalities {missing}, whose objective is not 'diffusion'")

    def __call__(self, batch) -> LatentBatch:
        rows = [self._row(*(t[b].numpy() for t in (batch.tokens, batch.positions, batch.document_ids)))
                for b in range(batch.tokens.shape[0])]
        tokens, positions, documents, spans = (torch.from_numpy(np.stack(col)) for col in zip(*(r[:4] for r in rows),
                                                                                             strict=True))
        # Span ids unique over the batch, in row-major order: the same order as the latents.
        offset, span_ids = 0, spans.clone()
        for b in range(len(rows)):
            inside = spans[b] >= 0
            span_ids[b][inside] += offset
            offset += int(spans[b].max()) + 1 if inside.any() else 0
        codes: dict[int, list[np.ndarray]] = {m: [] for m in self.codecs}
        for row in rows:
            for m, row_codes in row[4].items():
                codes[m] += row_codes
        latents = {}
        for m, codec in self.codecs.items():
            stacked = torch.from_numpy(np.stack(codes[m])) if codes[m] else torch.zeros(0, codec.grid**2,
                                                                                        dtype=torch.long)
            latents[m] = codec.codes_to_tokens(stacked)
        modality = self.vocab.modality_of(tokens)
        is_latent = torch.zeros_like(tokens, dtype=torch.bool)
        for m in self.codecs:
            is_latent |= modality == m
        after_latent = torch.zeros_like(is_latent)
        after_latent[:, 1:] = is_latent[:, :-1]
        target_mask = ~is_latent & (tokens != self.pad) & ~(after_latent & (tokens == self.eoi))
        return LatentBatch(tokens, modality, positions, documents, span_ids, target_mask, latents)

    def _row(self, tokens: np.ndarray, positions: np.ndarray, documents: np.ndarray):
        """One row, vectorised (a per-token loop cost ~10 ms per 8 x 1024 batch, a third of a small GPU step):
        every input token is kept once, a whole image's first code expands to its n latent tokens, the rest
        of a span (and any cut span) to nothing. `tests/test_transfusion.py` checks it against that loop."""
        seq_len = len(tokens)
        copies = np.ones(seq_len, dtype=np.int64)  # output tokens per input token
        out_id = tokens.copy()  # id of those outputs (placeholder ids for latents)
        runs: list[tuple[int, int, int]] = []  # (start, stop, modality) of whole image spans
        for m, r in self.ranges.items():
            inside = (tokens >= r.start) & (tokens < r.stop)
            if not inside.any():
                continue
            edges = np.diff(np.concatenate([[0], inside.astype(np.int8), [0]]))
            starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
            copies[inside] = 0
            out_id[inside] = r.start
            for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
                if b - a == self.codes_per_image[m]:  # a whole image; a span cut by the sequence edge is dropped
                    copies[a] = self.codecs[m].tokens_per_image
                    runs.append((a, b, m))
        runs.sort()
        span_of = np.full(seq_len, -1, dtype=np.int64)
        row_codes: dict[int, list[np.ndarray]] = {m: [] for m in self.codecs}
        for k, (a, b, m) in enumerate(runs):
            span_of[a] = k
            row_codes[m].append(tokens[a:b] - self.ranges[m].start)
        source = np.repeat(np.arange(seq_len), copies)  # input position of each output token
        kept = len(source)
        docs = documents[source]
        # Positions: each document piece keeps the position of its first kept token and counts on from there.
        out_positions = np.zeros(seq_len, dtype=np.int64)
        for d in np.unique(docs):
            where = np.flatnonzero(docs == d)
            out_positions[where] = positions[source[where[0]]] + np.arange(len(where))
        pad = seq_len - kept
        pad_doc = (int(documents.max()) + 1) if seq_len else 0
        tokens_out = np.concatenate([out_id[source], np.full(pad, self.pad, dtype=np.int64)])
        docs_out = np.concatenate([docs, np.full(pad, pad_doc, dtype=np.int64)])
        out_positions[kept:] = np.arange(pad)
        spans_out = np.concatenate([span_of[source], np.full(pad, -1, dtype=np.int64)])
        return tokens_out, out_positions, docs_out, spans_out, row_codes
