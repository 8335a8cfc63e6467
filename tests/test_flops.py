"""flops.py against the model itself: parameter counts and FlopCounterMode on a real fwd+bwd."""

from __future__ import annotations

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel

from mot.data.synthetic import random_layout, tokens_for_layout
from mot.flops import dense_baseline, flop_counter, param_counts, size_report
from mot.model import MoTTransformer, routing
from tests.conftest import tiny_config

CONFIGS = {
    "mot": tiny_config(dim=64, ffn_dim=160, qk_norm=True),
    "dense": tiny_config(dim=64, ffn_dim=160, untie=[]),
    "mot ffn only": tiny_config(dim=64, untie=["ffn"]),
    "mot tied embeddings": tiny_config(dim=64, tie_embeddings=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_count_matches_model(name):
    cfg = CONFIGS[name]
    model = MoTTransformer(cfg)
    total, embedding, _ = param_counts(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    assert embedding == model.embed.weight.numel() * (1 if cfg.tie_embeddings else 2)


@pytest.mark.parametrize("name", ["mot", "dense"])
@pytest.mark.parametrize("grouped", ["never", "always"])
def test_flops_match_flop_counter(name, grouped, generator, monkeypatch):
    monkeypatch.setattr(routing, "GROUPED_MM", grouped)
    cfg = CONFIGS[name]
    batch, seq_len = 2, 64
    model = MoTTransformer(cfg)
    tokens = tokens_for_layout(random_layout(batch, seq_len, [0, 1, 2], 12, generator), model.vocab, generator)
    # The math backend runs attention as bmm over the full T x T square, which the counter sees.
    with flop_counter() as counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens).float().square().mean().backward()
    measured = counter.get_total_flops()
    predicted = size_report(cfg, seq_len, attention="full").flops_forward_backward_mixed * batch * seq_len
    assert measured == pytest.approx(predicted, rel=0.02)


def test_mot_and_dense_do_the_same_flops_per_token_with_more_params():
    cfg = tiny_config(dim=64)
    mot, dense = size_report(cfg, 64), size_report(dense_baseline(cfg), 64)
    assert mot.flops_forward_backward_mixed == dense.flops_forward_backward_mixed
    assert mot.active_params_mixed == dense.active_params_mixed
    tower = dense.total_params - dense.embedding_params
    # Three towers of every non-embedding parameter.
    assert mot.total_params - mot.embedding_params == 3 * tower


def test_hand_computed_flops():
    """d=64, L=2, ffn=160, vocab 128 (80 ids + 8 specials padded to 64s), T=64."""
    cfg = tiny_config(dim=64, ffn_dim=160)
    report = size_report(cfg, 64, attention="full")
    matmul = 2 * (4 * 64 * 64 + 3 * 64 * 160) + 128 * 64
    attention = 2 * 2 * 2 * 64 * 64  # layers * (QK^T + AV) * 2 FLOPs * d * T
    assert report.flops_forward["text"] == 2 * matmul + attention
    causal = size_report(cfg, 64, attention="causal").attention_flops_forward
    assert causal == pytest.approx(attention * 65 / 128)
