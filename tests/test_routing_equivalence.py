"""The sorted, grouped routing computes exactly what mask routing (the authors' form) computes."""

from __future__ import annotations

import pytest
import torch

from mot.data.synthetic import random_layout, tokens_for_layout
from mot.model import ModelInputs, MoTTransformer, routing
from mot.model.kernels import Kernels
from mot.model.reference import mask_routed_forward
from tests.conftest import randomize_norms, tiny_config

LAYOUTS = {
    "all three": [0, 1, 2],
    "no image": [0, 2],  # image tower gets zero tokens
    "text only": [0],
    "image only": [1],
}


def _logits_of(model):
    return lambda tokens: model(ModelInputs(tokens)).logits


def _logits_and_grads(model, forward, tokens):
    model.zero_grad(set_to_none=True)
    logits = forward(tokens)
    # A fixed random projection of the logits as the loss: every logit's gradient is nonzero.
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7), dtype=logits.dtype)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_matches_mask_reference(model, tokens):
    """Logits and every gradient of the sorted routing against the float64 mask-routed oracle."""
    ours, our_grads = _logits_and_grads(model, _logits_of(model), tokens)
    ref, ref_grads = _logits_and_grads(model, lambda t: mask_routed_forward(model, t), tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    for name in ref_grads:
        torch.testing.assert_close(our_grads[name], ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("placement", ["pre", "chameleon"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_sorted_routing_equals_mask_reference_float64(layout_name, placement, qk_norm, generator):
    cfg = tiny_config(norm_placement=placement, qk_norm=qk_norm)
    model = MoTTransformer(cfg).double()
    randomize_norms(model, generator)
    layout = random_layout(3, 40, LAYOUTS[layout_name], max_span=9, generator=generator)
    tokens = tokens_for_layout(layout, model.vocab, generator)


    assert_matches_mask_reference(model, tokens)


@pytest.mark.parametrize("kv_heads", [0, 2, 1])
@pytest.mark.parametrize("qk_norm_type", ["rms", "layernorm_per_head"])
def test_grouped_query_attention_and_head_norms_equal_mask_reference(kv_heads, qk_norm_type, generator):
    """GQA (the reference repeats each key/value head for its group of queries) and Chameleon's per-head
    LayerNorm q/k norms, per tower, gradients included."""
    cfg = tiny_config(n_kv_heads=kv_heads, qk_norm=True, qk_norm_type=qk_norm_type, norm_placement="chameleon")
    model = MoTTransformer(cfg).double()
    randomize_norms(model, generator)  # gains and the q/k norms' biases differ per tower (and per head)
    assert model.blocks[0].attn.qkv.weight.shape[1] == cfg.dim + 2 * cfg.kv_dim
    tokens = tokens_for_layout(random_layout(2, 33, [0, 1, 2], 7, generator), model.vocab, generator)
    assert_matches_mask_reference(model, tokens)


@pytest.mark.parametrize("untie", [["ffn"], ["attn"], ["norm"], ["attn", "norm"]])
def test_partial_untying_equals_mask_reference(untie, generator):
    """The paper's ablations: any subset of components untied."""
    cfg = tiny_config(untie=untie, qk_norm=True)
    model = MoTTransformer(cfg).double()
    randomize_norms(model, generator)
    tokens = tokens_for_layout(random_layout(2, 33, [0, 1, 2], 7, generator), model.vocab, generator)
    assert_matches_mask_reference(model, tokens)


@pytest.mark.parametrize("layout_name", ["all three", "no image"])
def test_grouped_mm_path_equals_split_path(layout_name, generator):
    """torch._grouped_mm (forced on the CPU) against split + matmul, same weights, float32."""
    model = MoTTransformer(tiny_config(kernels="split"))
    randomize_norms(model, generator)
    tokens = tokens_for_layout(random_layout(2, 48, LAYOUTS[layout_name], 11, generator), model.vocab, generator)
    split, split_grads = _logits_and_grads(model, _logits_of(model), tokens)
    model.kernels = Kernels("grouped")
    grouped, grouped_grads = _logits_and_grads(model, _logits_of(model), tokens)
    torch.testing.assert_close(grouped, split, rtol=1e-5, atol=1e-6)
    for name in split_grads:
        torch.testing.assert_close(grouped_grads[name], split_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_route_sort_groups_modalities_stably():
    modality = torch.tensor([[2, 0, 1, 0], [1, 2, 0, 0]])
    route = routing.route_tokens(modality, 3)
    assert route.sorted_modality.tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    # Stable: within a modality, tokens keep their natural order.
    assert route.order.tolist() == [1, 3, 6, 7, 2, 4, 0, 5]
    assert route.offsets.tolist() == [4, 6, 8]
    rows = torch.arange(8.0)[:, None]
    assert torch.equal(route.unsort(route.sort(rows)), rows)
    # A tower with no tokens gets an empty slice.
    empty_middle = routing.route_tokens(torch.tensor([2, 0, 2]), 3)
    assert empty_middle.offsets.tolist() == [1, 1, 3]
    assert empty_middle.counts.tolist() == [1, 0, 2]


def test_permutation_backward_is_the_inverse_gather():
    modality = torch.tensor([2, 0, 1, 0, 1])
    route = routing.route_tokens(modality, 3)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: route.sort(t), (x,))
    torch.autograd.gradcheck(lambda t: route.unsort(t), (x,))
    weight = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda w: route.expand(w), (weight,))


def test_dense_model_never_permutes():
    model = MoTTransformer(tiny_config(untie=[]))
    route = model.route(torch.tensor([[2, 0, 1]]))
    assert route.order is None
    assert all(p.shape[0] == 1 for n, p in model.named_parameters() if "blocks" in n)


ONE_TOWER_CONFIGS = {
    "linear, rms q/k norms": dict(qk_norm=True),
    "chameleon, per-head layernorm": dict(qk_norm=True, qk_norm_type="layernorm_per_head", norm_placement="chameleon"),
    "pattention, unequal towers": dict(projection="pattention", param_tokens_per_modality=[8, 4, 6]),
    "ffn untied only": dict(untie=["ffn"]),
}


@pytest.mark.parametrize("config_name", list(ONE_TOWER_CONFIGS))
@pytest.mark.parametrize("modality", [1, 2])
def test_host_counts_of_one_tower_skip_the_sort_and_equal_mask_reference(config_name, modality, generator):
    """Host counts that put every token in one tower (a decoding step) give the identity route on that tower's
    slices, ordinary layers: the same logits and gradients as the float64 mask-routed oracle."""
    model = MoTTransformer(tiny_config(**ONE_TOWER_CONFIGS[config_name])).double()
    randomize_norms(model, generator)
    with torch.no_grad():  # every tower's parameters differ, so a wrong slice shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        for module in model.modules():
            if hasattr(module, "zero_padding_"):
                module.zero_padding_()
    tokens = tokens_for_layout(random_layout(2, 17, [modality], 17, generator), model.vocab, generator)
    counts = [0, 0, 0]
    counts[modality] = tokens.numel()
    route = model.route(model.vocab.modality_of(tokens), counts)
    assert route.tower == modality and route.order is None
    ours, our_grads = _logits_and_grads(model, lambda t: model(ModelInputs(t, tower_counts=counts)).logits, tokens)
    ref, ref_grads = _logits_and_grads(model, lambda t: mask_routed_forward(model, t), tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    for name in ref_grads:
        torch.testing.assert_close(our_grads[name], ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_host_counts_across_towers_still_sort():
    route = routing.route_tokens(torch.tensor([[1, 1, 0]]), 3, host_counts=(1, 2, 0))
    assert route.tower is None and route.order.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="do not match"):
        routing.route_tokens(torch.tensor([[1, 1, 0]]), 3, host_counts=(0, 3, 0))
