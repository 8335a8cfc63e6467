"""Synthetic interleaved batches: modality layouts and random ids inside each modality's range.

For tests and benchmarks; real data comes from `mot prepare`.
"""

from __future__ import annotations

import torch

from mot.vocab import UnifiedVocab


def layout_from_spans(spans: list[list[tuple[int, int]]]) -> torch.Tensor:
    """(B, T) modality index from per-sequence lists of (modality, length) spans."""
    rows = [torch.cat([torch.full((n,), m, dtype=torch.long) for m, n in seq]) for seq in spans]
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"sequences have different lengths: {[len(r) for r in rows]}")
    return torch.stack(rows)


def random_layout(
    batch: int,
    seq_len: int,
    modalities: list[int],
    max_span: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """(B, T) layout of random spans (1..max_span tokens) drawn from the given modality indices."""
    spans = []
    for _ in range(batch):
        seq, filled = [], 0
        while filled < seq_len:
            modality = modalities[int(torch.randint(len(modalities), (1,), generator=generator))]
            length = min(int(torch.randint(1, max_span + 1, (1,), generator=generator)), seq_len - filled)
            seq.append((modality, length))
            filled += length
        spans.append(seq)
    return layout_from_spans(spans)


def tokens_for_layout(modality: torch.Tensor, vocab: UnifiedVocab, generator: torch.Generator) -> torch.Tensor:
    """Uniform random ids, each inside the id range of its position's modality."""
    tokens = torch.empty_like(modality)
    for r in vocab.ranges:
        mask = modality == r.index
        tokens[mask] = r.start + torch.randint(r.size, (int(mask.sum()),), generator=generator)
    return tokens


def bench_layout(seq_len: int = 4096) -> torch.Tensor:
    """Two sequences with 1656 text, 5120 image (5 x 1024) and 1416 speech tokens at seq_len 4096
    (the 3-modality layout of DESIGN.md's routing table); other lengths are scaled."""
    s = seq_len / 4096
    n = lambda x: int(round(x * s))
    image = n(1024)
    first = [(0, n(414)), (1, image), (0, n(414)), (1, image), (2, n(196)), (1, image)]
    second = [(0, n(828)), (1, image), (2, n(700)), (1, image)]
    for seq in (first, second):
        used = sum(length for _, length in seq)
        seq.append((2, seq_len - used))  # speech fills the rest
    return layout_from_spans([first, second])
