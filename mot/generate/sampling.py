"""Next-token sampling: temperature, top-k, top-p (nucleus), from a seeded torch.Generator.

Disallowed ids arrive as -inf logits (mot.generate.constraints) and are never drawn. Drawing is
Gumbel-max over the whole row (argmax of logits - log(Exp(1) noise)): an exact sample of the
softmax that needs no host sync and cannot land on a zero-probability id by rounding, as an
inverse-CDF search can at the top of a float cumsum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely ids; 0 = all
    top_p: float = 1.0  # keep the smallest set of ids whose probability reaches top_p; 1 = all

    def check(self) -> SamplingConfig:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) logits with the ids outside the top-k and outside the top-p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # Drop an id when the ids before it already reach top_p; the most likely id always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) sampled ids. Draws B * V noise values every call, whatever the logits."""
    logits = logits.float()
    if config.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / config.temperature, config.top_k, config.top_p)
    noise = torch.empty_like(logits).exponential_(generator=generator)
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)  # a 0 draw would give a disallowed id -inf + inf = NaN
    return (logits - noise.log()).argmax(-1)
