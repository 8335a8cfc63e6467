"""Dense is MoT with nothing untied; MoT gradients reach exactly the towers of the modalities present."""

from __future__ import annotations

import pytest
import torch

from mot.data.synthetic import random_layout, tokens_for_layout
from mot.model import ModelInputs, MoTTransformer
from tests.conftest import randomize_norms, tiny_config


def _copy_dense_into_every_tower(dense: MoTTransformer, mot: MoTTransformer) -> None:
    with torch.no_grad():
        mot_params = dict(mot.named_parameters())
        for name, p in dense.named_parameters():
            target = mot_params[name]
            target.copy_(p.expand_as(target) if target.shape != p.shape else p)


def _loss(model, tokens):
    logits = model(ModelInputs(tokens)).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    return (logits * weights).sum() / logits.numel(), logits


@pytest.mark.parametrize("placement", ["pre", "chameleon"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_mot_with_identical_towers_equals_dense(placement, qk_norm, generator):
    dense = MoTTransformer(tiny_config(untie=[], norm_placement=placement, qk_norm=qk_norm))
    randomize_norms(dense, generator)
    mot = MoTTransformer(tiny_config(norm_placement=placement, qk_norm=qk_norm))
    _copy_dense_into_every_tower(dense, mot)
    tokens = tokens_for_layout(random_layout(3, 48, [0, 1, 2], 10, generator), dense.vocab, generator)

    dense_loss, dense_logits = _loss(dense, tokens)
    mot_loss, mot_logits = _loss(mot, tokens)
    torch.testing.assert_close(mot_logits, dense_logits, rtol=1e-5, atol=1e-5)
    dense_loss.backward()
    mot_loss.backward()
    mot_params = dict(mot.named_parameters())
    for name, p in dense.named_parameters():
        mot_grad = mot_params[name].grad
        if mot_grad.shape != p.grad.shape:  # towers: each got its own tokens' share of the dense gradient
            mot_grad = mot_grad.sum(0, keepdim=True)
        torch.testing.assert_close(mot_grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kernels", ["per_tower", "grouped"])
def test_absent_modality_gets_exactly_zero_gradient(kernels, generator):
    model = MoTTransformer(tiny_config(qk_norm=True, kernels=kernels))
    randomize_norms(model, generator)
    image = model.vocab["image"].index
    tokens = tokens_for_layout(random_layout(2, 40, [0, 2], 8, generator), model.vocab, generator)
    assert not (model.vocab.modality_of(tokens) == image).any()
    loss, _ = _loss(model, tokens)
    loss.backward()
    checked = 0
    for name, p in model.named_parameters():
        if p.dim() >= 2 and p.shape[0] == 3:  # an untied parameter: one slice per tower
            assert torch.count_nonzero(p.grad[image]) == 0, f"{name}: image tower got a gradient"
            for present in (0, 2):
                assert p.grad[present].abs().sum() > 0, f"{name}: tower {present} got no gradient"
            checked += 1
    # attn_norm, qkv, q_norm, k_norm, out, ffn_norm, w13, w2 per layer, plus the final norm
    assert checked == 8 * model.cfg.n_layers + 1
