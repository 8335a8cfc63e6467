"""flops.py against the model itself: parameter counts and FlopCounterMode on a real fwd+bwd."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mot.data.synthetic import random_layout, tokens_for_layout
from mot.flops import (
    ar_image_sampling_flops,
    dense_baseline,
    diffusion_image_sampling_flops,
    flop_counter,
    param_counts,
    size_report,
)
from mot.model import ModelInputs, MoTTransformer
from tests.conftest import tiny_config
from tests.test_transfusion import diffusion_config  # image under diffusion: a 4x4 grid of 4-channel latents

CONFIGS = {
    "mot": tiny_config(dim=64, ffn_dim=160, qk_norm=True),
    "dense": tiny_config(dim=64, ffn_dim=160, untie=[]),
    "mot ffn only": tiny_config(dim=64, untie=["ffn"]),
    "mot tied embeddings": tiny_config(dim=64, tie_embeddings=True),
    # Chameleon's options: grouped-query attention, per-head LayerNorm q/k norms with bias
    "mot gqa": tiny_config(dim=64, ffn_dim=160, n_kv_heads=2, qk_norm=True, qk_norm_type="layernorm_per_head"),
    "dense gqa": tiny_config(dim=64, ffn_dim=160, untie=[], n_kv_heads=1, qk_norm=True,
                             qk_norm_type="layernorm_per_head"),
}

# The image modality under the diffusion objective (Transfusion setting): latent projections too.
DIFFUSION_CONFIGS = {
    "mot": diffusion_config(dim=64, ffn_dim=160, qk_norm=True),
    "dense": diffusion_config(dim=64, ffn_dim=160, untie=[]),
    "mot patch 2": diffusion_config(patch_size=2, dim=64, untie=["ffn"]),
}


@pytest.mark.parametrize("cfg", [*CONFIGS.values(), *DIFFUSION_CONFIGS.values()],
                         ids=[*CONFIGS, *(f"diffusion {k}" for k in DIFFUSION_CONFIGS)])
def test_param_count_matches_model(cfg):
    model = MoTTransformer(cfg)
    total, embedding, _ = param_counts(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    assert embedding == model.embed.weight.numel() * (1 if cfg.tie_embeddings else 2)


@pytest.mark.parametrize("name", ["mot", "dense", "mot gqa", "dense gqa"])
@pytest.mark.parametrize("kernels", ["per_tower", "grouped"])
def test_flops_match_flop_counter(name, kernels, generator):
    cfg = dataclasses.replace(CONFIGS[name], kernels=kernels)
    batch, seq_len = 2, 64
    model = MoTTransformer(cfg)
    tokens = tokens_for_layout(random_layout(batch, seq_len, [0, 1, 2], 12, generator), model.vocab, generator)
    # The math backend runs attention as bmm over the full T x T square, which the counter sees.
    with flop_counter() as counter, sdpa_kernel(SDPBackend.MATH):
        model(ModelInputs(tokens)).logits.float().square().mean().backward()
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


# ---------------------------------------------------------------- diffusion modalities (Transfusion setting)


@pytest.mark.parametrize("name", list(DIFFUSION_CONFIGS))
def test_param_count_includes_the_latent_projections(name):
    cfg = DIFFUSION_CONFIGS[name]
    model = MoTTransformer(cfg)
    total, _, _ = param_counts(cfg)  # equal to the model's count: test_param_count_matches_model
    report = size_report(cfg, 64)
    assert report.latent_params == sum(p.numel() for p in model.latent_io.parameters()) > 0
    assert report.total_params == total


def _diffusion_step(model, cfg, generator, backward: bool):
    """Counted forward (and backward) of the model on random spans, every image position a latent token.
    Returns (measured FLOPs, tokens per modality)."""
    batch, seq_len = 2, 64
    tokens = tokens_for_layout(random_layout(batch, seq_len, [0, 1, 2], 12, generator), model.vocab, generator)
    modality = model.vocab.modality_of(tokens)
    n = int((modality == 1).sum())
    latents = {1: torch.randn(n, cfg.modalities[1].patch_dim, generator=generator)}
    times = {1: torch.rand(n, generator=generator)}
    with flop_counter() as counter, sdpa_kernel(SDPBackend.MATH):
        logits, predictions = model(ModelInputs(tokens, modality, latents=latents, timesteps=times))
        if backward:
            (logits.float().square().mean() + predictions[1].square().mean()).backward()
    counts = [int((modality == m).sum()) for m in range(cfg.n_modalities)]
    return counter.get_total_flops(), counts


@pytest.mark.parametrize("name", list(DIFFUSION_CONFIGS))
@pytest.mark.parametrize("kernels", ["per_tower", "grouped"])
def test_diffusion_forward_flops_match_flop_counter(name, kernels, generator):
    cfg = dataclasses.replace(DIFFUSION_CONFIGS[name], kernels=kernels)
    model = MoTTransformer(cfg)
    measured, counts = _diffusion_step(model, cfg, generator, backward=False)
    report = size_report(cfg, 64, attention="full")
    predicted = sum(c * report.flops_forward[m.name] for c, m in zip(counts, cfg.modalities, strict=True))
    assert counts[1] > 0
    assert measured == pytest.approx(predicted, rel=0.02)


@pytest.mark.parametrize("name", ["mot", "dense"])
def test_diffusion_forward_backward_flops_match_flop_counter(name, generator):
    """Backward: the latent input projection and the timestep MLP's first layer get weight gradients only."""
    cfg = DIFFUSION_CONFIGS[name]
    model = MoTTransformer(cfg)
    measured, counts = _diffusion_step(model, cfg, generator, backward=True)
    report = size_report(cfg, 64, attention="full")
    predicted = sum(c * report.flops_forward_backward[m.name] for c, m in zip(counts, cfg.modalities, strict=True))
    assert measured == pytest.approx(predicted, rel=0.02)


def test_hand_computed_diffusion_token_flops():
    """d=64, L=2, ffn=160, vocab 128, latent tokens of 4 numbers (n = 16 per image), T=64."""
    cfg = diffusion_config(dim=64, ffn_dim=160)
    full, causal = size_report(cfg, 64, attention="full"), size_report(cfg, 64, attention="causal")
    tower_and_head = 2 * (4 * 64 * 64 + 3 * 64 * 160) + 128 * 64
    leaf = 4 * 64 + 256 * 64  # input projection, timestep MLP's first layer: no input gradient
    inner = 64 * 64 + 64 * 4  # timestep MLP's second layer, output projection
    attention = 2 * 2 * 2 * 64 * 64
    assert full.flops_forward["image"] == 2 * (tower_and_head + leaf + inner) + attention
    assert full.flops_forward["text"] == 2 * tower_and_head + attention  # AR tokens: unchanged
    assert full.flops_forward_backward["image"] == 3 * (2 * (tower_and_head + inner) + attention) + 2 * 2 * leaf
    # Causal: a latent token also sees the rest of its bidirectional span, (16 - 1) / 2 more keys on average.
    span = 2 * 2 * 2 * 64 * 15 / 2
    assert causal.flops_forward["image"] == pytest.approx(
        2 * (tower_and_head + leaf + inner) + attention * 65 / 128 + span
    )
    assert full.latent_params == leaf + inner + 3 * 64 + 4
    assert full.active_params["image"] == full.active_params["text"] + full.latent_params


def test_dense_baseline_of_a_diffusion_recipe_keeps_the_latent_projections():
    cfg = diffusion_config(dim=64)
    mot, dense = size_report(cfg, 64), size_report(dense_baseline(cfg), 64)
    assert mot.flops_forward == dense.flops_forward
    assert mot.flops_forward_backward_mixed == dense.flops_forward_backward_mixed
    assert mot.latent_params == dense.latent_params > 0
    assert mot.total_params - mot.embedding_params - mot.latent_params == 3 * (
        dense.total_params - dense.embedding_params - dense.latent_params
    )


def test_hand_computed_image_sampling_flops():
    """d=32, L=2, ffn=48, vocab 128; n = 16 latent tokens of 4 numbers; prefix P = 5, 3 steps."""
    cfg = diffusion_config()
    tower_and_head = 2 * (4 * 32 * 32 + 3 * 32 * 48) + 128 * 32  # 21504
    latent_io = 4 * 32 + 256 * 32 + 32 * 32 + 32 * 4  # 9472
    attend = 2 * 2 * 2 * 32  # FLOPs per key per query, all layers

    def denoise_pass(keys):  # 16 latent tokens, each seeing `keys` keys
        return 16 * (2 * (tower_and_head + latent_io) + attend * keys)

    cond, uncond = denoise_pass(5 + 16), denoise_pass(2 + 16)
    assert (cond, uncond) == (1_077_248, 1_064_960)
    assert diffusion_image_sampling_flops(cfg, "image", steps=3, prefix_len=5) == 3 * cond + cond
    guided = diffusion_image_sampling_flops(cfg, 1, steps=3, prefix_len=5, guidance=True)
    assert guided == 3 * (cond + uncond) + cond == 7_503_872

    # AR over the same 16 codes: code i = 1..16 sees the prefix and codes 1..i; no latent projections.
    ar = sum(2 * tower_and_head + attend * (5 + i) for i in range(1, 17))
    ar_uncond = sum(2 * tower_and_head + attend * (2 + i) for i in range(1, 17))
    assert ar_image_sampling_flops(cfg, "image", prefix_len=5) == ar == 743_424
    assert ar_image_sampling_flops(cfg, "image", prefix_len=5, guidance=True) == ar + ar_uncond == 1_474_560
    assert ar_image_sampling_flops(cfg, "text", prefix_len=5, codes=16) == ar  # same tower sizes

    with pytest.raises(ValueError, match="diffusion"):
        diffusion_image_sampling_flops(cfg, "text", steps=3, prefix_len=5)
    with pytest.raises(ValueError, match="codes"):
        ar_image_sampling_flops(cfg, "text", prefix_len=5)


def _packed_ids(generator: torch.Generator, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) document ids (runs of random lengths) and span ids (-1, or k inside the row's k-th span)."""
    documents, spans = torch.zeros(batch, seq_len, dtype=torch.long), torch.full((batch, seq_len), -1)
    for b in range(batch):
        t, doc, span = 0, 0, 0
        while t < seq_len:
            length = int(torch.randint(1, 24, (), generator=generator))
            documents[b, t : t + length] = doc
            if length > 6:  # a bidirectional span inside the document
                start = t + int(torch.randint(0, length - 5, (), generator=generator))
                spans[b, start : start + 5] = span
                span += 1
            t, doc = t + length, doc + 1
    return documents, spans


def test_attention_pairs_count_what_the_training_masks_allow(generator):
    from mot.data.loader import document_causal_mask
    from mot.flops import attention_pairs
    from mot.model.masks import mixed_mask

    documents, spans = _packed_ids(generator, 3, 97)
    assert attention_pairs(documents) == int(document_causal_mask(documents).sum())
    assert attention_pairs(documents, spans) == int(mixed_mask(documents, spans).sum())
    one = torch.zeros(2, 50, dtype=torch.long)  # one document per row: the full-row causal triangle
    assert attention_pairs(one) == 2 * 50 * 51 // 2


@pytest.mark.parametrize("name", ["mot", "dense", "mot gqa"])
def test_masked_count_of_one_document_rows_is_the_full_causal_count(name):
    from mot.flops import attention_flops, attention_pairs, projection_flops_per_token

    cfg, batch, seq_len = CONFIGS[name], 3, 64
    pairs = attention_pairs(torch.zeros(batch, seq_len, dtype=torch.long))
    masked = batch * seq_len * projection_flops_per_token(cfg) + 3 * attention_flops(cfg, pairs)
    full = batch * seq_len * size_report(cfg, seq_len, attention="causal").flops_forward_backward_mixed
    assert masked == pytest.approx(full, rel=1e-12)


@pytest.mark.parametrize("name", ["mot", "mot gqa", "dense"])
def test_flops_match_a_mask_routed_model_of_plain_matmuls(name, generator):
    """No formula of ours on either side: the slow oracle routes with boolean masks and multiplies with plain
    `@` per tower (FlopCounterMode's own mm/bmm counts), attention as explicit float64 matmuls over the
    whole T x T square; against size_report's count with attention = "full"."""
    from mot.model.reference import mask_routed_forward

    cfg = CONFIGS[name]
    batch, seq_len = 2, 32
    model = MoTTransformer(cfg).double()
    tokens = tokens_for_layout(random_layout(batch, seq_len, [0, 1, 2], 12, generator), model.vocab, generator)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        mask_routed_forward(model, tokens).square().mean().backward()
    predicted = size_report(cfg, seq_len, attention="full").flops_forward_backward_mixed * batch * seq_len
    assert counter.get_total_flops() == pytest.approx(predicted, rel=1e-12)


def test_the_trainer_counts_attention_under_each_batchs_document_mask(tmp_path, monkeypatch):
    """flops in the log: projections per token plus attention over the pairs each batch's mask allows, less than
    the full-row causal count for packed short documents."""
    from mot.flops import attention_flops, attention_pairs, projection_flops_per_token
    from mot.objectives import training as objectives
    from mot.train.trainer import train
    from tests.runs import make_shards, run_config

    seen = []

    def recording(document_ids, span_ids=None):
        seen.append(attention_pairs(document_ids, span_ids))
        return seen[-1]

    monkeypatch.setattr(objectives, "attention_pairs", recording)
    cfg = run_config(make_shards(tmp_path / "shards"), tmp_path, steps=3, micro_batch_size=2, eval_every=0)
    result = train(cfg, progress=False)
    summary = __import__("json").loads((result.run_dir / "summary.json").read_text())
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
    assert len(seen) == cfg.train.steps * 2  # one count per micro-batch
    expected = tokens * projection_flops_per_token(cfg.model) + 3 * attention_flops(cfg.model, sum(seen))
    assert summary["flops"] == pytest.approx(expected, rel=1e-12)
    full = tokens * size_report(cfg.model, cfg.train.seq_len).flops_forward_backward_mixed
    assert summary["flops"] < full
