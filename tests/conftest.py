"""Shared tiny configs for the CPU tests."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mot.config import ModalityConfig, ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    base = ModelConfig(
        dim=32,
        n_layers=2,
        n_heads=4,
        ffn_dim=48,
        modalities=[ModalityConfig("text", 40), ModalityConfig("image", 24), ModalityConfig("speech", 16)],
        n_special_tokens=8,
        max_seq_len=64,
    )
    return dataclasses.replace(base, **overrides)


def randomize_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm gains start at 1 (identical across towers); make them differ so routing errors show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
