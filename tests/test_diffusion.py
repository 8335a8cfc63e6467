"""Diffusion pieces: the forward process at its ends and against hand values, and the mixed attention mask."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mot.model.masks import mixed_block_mask, mixed_mask
from mot.objectives.diffusion import add_noise, cosine_alpha_bar, mixing, predicted_clean, target


@pytest.mark.parametrize("schedule", ["ddpm_cosine", "flow"])
def test_zero_noise_at_t0_and_pure_noise_at_t1(schedule, generator):
    x0 = torch.randn(4, 3, 8, 8, generator=generator, dtype=torch.float64)
    eps = torch.randn(4, 3, 8, 8, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(add_noise(x0, torch.zeros(4, dtype=torch.float64), eps, schedule), x0)
    torch.testing.assert_close(add_noise(x0, torch.ones(4, dtype=torch.float64), eps, schedule), eps)


def test_schedules_against_hand_values():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    s = 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    expected = torch.tensor([1.0, f(0.5) / f(0.0), 0.0], dtype=torch.float64)
    torch.testing.assert_close(cosine_alpha_bar(t), expected, atol=1e-12, rtol=0)
    signal, sigma = mixing(t, "ddpm_cosine")
    torch.testing.assert_close(signal**2 + sigma**2, torch.ones(3, dtype=torch.float64))  # variance preserving
    signal, sigma = mixing(t, "flow")
    assert signal.tolist() == [1.0, 0.5, 0.0] and sigma.tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="unknown schedule"):
        mixing(t, "linear")


@pytest.mark.parametrize("schedule", ["ddpm_cosine", "flow"])
def test_the_exact_prediction_recovers_the_clean_latent(schedule, generator):
    x0 = torch.randn(5, 16, generator=generator, dtype=torch.float64)
    eps = torch.randn(5, 16, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    x_t = add_noise(x0, t, eps, schedule)
    torch.testing.assert_close(predicted_clean(x_t, t, target(x0, eps, schedule), schedule), x0)


def _layout():
    """One sequence of 12: text 0-2, image span 3-6, text 7-8 | next document: image span 9-10, text 11."""
    document_ids = torch.tensor([[0] * 9 + [1] * 3])
    span_ids = torch.tensor([[-1, -1, -1, 0, 0, 0, 0, -1, -1, 1, 1, -1]])
    return document_ids, span_ids


def test_mixed_mask_by_hand():
    document_ids, span_ids = _layout()
    mask = mixed_mask(document_ids, span_ids)[0, 0]
    for q in range(12):
        for k in range(12):
            same_doc = document_ids[0, q] == document_ids[0, k]
            in_same_span = span_ids[0, q] >= 0 and span_ids[0, q] == span_ids[0, k]
            assert bool(mask[q, k]) == bool(same_doc and (k <= q or in_same_span)), (q, k)
    assert mask[3, 6] and mask[4, 6]  # an image token sees later tokens of its own image ...
    assert not mask[6, 7] and not mask[3, 7]  # ... and nothing after the image
    text = [0, 1, 2, 7, 8, 11]
    assert not any(mask[q, k] for q in text for k in range(q + 1, 12))  # text never attends forward
    assert not mask[9, 8] and not mask[10, 3]  # nothing crosses into another document


def test_mixed_block_mask_gives_the_same_attention_as_the_boolean_mask(generator):
    from torch.nn.attention.flex_attention import flex_attention

    document_ids = torch.tensor([[0] * 150 + [1] * 106])
    span_ids = torch.full((1, 256), -1)
    span_ids[0, 20:84] = 0  # an image crossing a 128-token tile
    span_ids[0, 160:224] = 1
    q, k, v = (torch.randn(1, 2, 256, 16, generator=generator) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mixed_mask(document_ids, span_ids))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flex = flex_attention(q, k, v, block_mask=mixed_block_mask(document_ids, span_ids))
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
