"""Small numerical pieces against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch

from mot.model import ModelInputs, MoTTransformer
from mot.model.rope import RotaryEmbedding, apply_rotary, apply_rotary_together
from mot.objectives.ar import next_token_loss
from mot.vocab import UnifiedVocab
from tests.conftest import randomize_norms, tiny_config


def test_unified_vocab_layout_and_modality_of():
    vocab = UnifiedVocab(tiny_config())  # text 40, image 24, speech 16, 8 specials -> 88, padded to 128
    assert [(r.name, r.start, r.stop) for r in vocab.ranges] == [
        ("text", 0, 40), ("image", 40, 64), ("speech", 64, 80)]
    assert vocab.size == 128
    assert vocab.special_id("<boi>") == 83
    ids = torch.tensor([0, 39, 40, 63, 64, 79, 80, 87, 127])
    assert vocab.modality_of(ids).tolist() == [0, 0, 1, 1, 2, 2, 0, 0, 0]
    speech_specials = UnifiedVocab(tiny_config(special_modality="speech"))
    assert speech_specials.modality_of(torch.tensor([80])).tolist() == [2]


def test_rotary_matches_a_per_pair_rotation():
    x = torch.randn(1, 5, 2, 8, dtype=torch.float64)
    positions = torch.tensor([0, 1, 2, 7, 100])
    cos, sin = RotaryEmbedding(8, 128, 10000.0).double()(5, positions)
    out = apply_rotary(x, cos, sin)
    for t, pos in enumerate(positions.tolist()):
        for i in range(4):  # pair (i, i + 4) rotated by pos * theta^(-2i/8)
            angle = pos * 10000.0 ** (-2 * i / 8)
            a, b = x[0, t, :, i], x[0, t, :, i + 4]
            torch.testing.assert_close(out[0, t, :, i], a * math.cos(angle) - b * math.sin(angle))
            torch.testing.assert_close(out[0, t, :, i + 4], b * math.cos(angle) + a * math.sin(angle))


def test_rotating_queries_and_keys_together_equals_rotating_each():
    q, k = torch.randn(2, 5, 4, 8, dtype=torch.bfloat16), torch.randn(2, 5, 2, 8, dtype=torch.bfloat16)
    cos, sin = RotaryEmbedding(8, 64, 10000.0)(5, torch.tensor([[0, 1, 2, 3, 9], [4, 5, 6, 7, 8]]))
    together = apply_rotary_together(q, k, cos, sin)
    assert torch.equal(together[0], apply_rotary(q, cos, sin)) and torch.equal(together[1], apply_rotary(k, cos, sin))


@pytest.mark.parametrize("untie", [[], ["attn", "ffn", "norm"]])
def test_a_bf16_forward_without_gradients_equals_the_training_forward_bit_for_bit(untie):
    """Without gradients (decoding, evaluation) the norms take bf16 directly and queries and keys rotate
    together, in fewer ops; the values must stay those of the training forward."""
    torch.manual_seed(0)
    model = MoTTransformer(tiny_config(untie=untie, qk_norm=True, n_heads=4, n_kv_heads=2)).to(torch.bfloat16)
    randomize_norms(model, torch.Generator().manual_seed(1))
    text = torch.randint(0, 40, (2, 12))  # text ids only: one tower, the norms' one-tower path
    mixed = torch.randint(8, model.vocab.size, (2, 12))
    for tokens in (text, mixed):
        with torch.no_grad():
            inference = model(ModelInputs(tokens)).logits
        training = model(ModelInputs(tokens)).logits
        assert training.requires_grad and torch.equal(inference, training.detach())


def test_casting_the_model_to_bf16_keeps_rotary_tables_in_float32():
    model = MoTTransformer(tiny_config()).to(torch.bfloat16)
    assert model.rope.cos.dtype == torch.float32
    reference = RotaryEmbedding(8, 64, 10000.0).double()
    torch.testing.assert_close(model.rope.cos.double(), reference.cos, rtol=0, atol=1e-7)


def test_next_token_loss_matches_per_token_loop():
    logits = torch.randn(2, 6, 10, dtype=torch.float64)
    tokens = torch.randint(10, (2, 6))
    modality = torch.randint(3, (2, 6))
    mean, loss_sum, count = next_token_loss(logits, tokens, modality, 3)
    sums, counts, total = [0.0] * 3, [0] * 3, []
    for b in range(2):
        for t in range(5):
            nll = -torch.log_softmax(logits[b, t], -1)[tokens[b, t + 1]].item()
            m = modality[b, t + 1].item()
            sums[m] += nll
            counts[m] += 1
            total.append(nll)
    assert math.isclose(mean.item(), sum(total) / len(total), rel_tol=1e-6)
    torch.testing.assert_close(loss_sum.double(), torch.tensor(sums, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert count.tolist() == counts


def test_explicit_causal_mask_and_positions_equal_the_defaults():
    model = MoTTransformer(tiny_config()).double()
    tokens = torch.randint(80, (2, 12))
    causal = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, 1, 12, 12)
    positions = torch.arange(12).expand(2, 12)
    explicit = model(ModelInputs(tokens, positions=positions, attn_mask=causal)).logits
    torch.testing.assert_close(explicit, model(ModelInputs(tokens)).logits)


def test_a_document_starting_mid_sequence_sees_nothing_before_it():
    """With a document mask and restarted positions, the second document's logits equal
    those of running it alone: what the packed loader will rely on."""
    model = MoTTransformer(tiny_config()).double()
    first, second = torch.randint(80, (1, 5)), torch.randint(80, (1, 7))
    packed = torch.cat([first, second], dim=1)
    doc = torch.tensor([0] * 5 + [1] * 7)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    out = model(ModelInputs(packed, positions=positions, attn_mask=mask[None, None])).logits
    torch.testing.assert_close(out[:, 5:], model(ModelInputs(second)).logits)
