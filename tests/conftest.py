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


def reset_accelerator() -> None:
    """accelerate keeps one process-wide state and refuses a second precision in one process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def fresh_accelerator_state():
    """For tests that train in bf16 (the others train in fp32): a clean accelerate state before and after."""
    reset_accelerator()
    yield
    reset_accelerator()


class Counter:
    """Wraps a function and counts its calls (which kernel ran, in the routing tests)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)
