"""TokenFormer's Pattention as tower projections: the layer by hand, routing, the config switch, FLOPs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mot.config import ConfigError, RunConfig, config_from_dict, config_to_dict
from mot.data.synthetic import random_layout, tokens_for_layout
from mot.flops import flop_counter, param_counts, size_report
from mot.model import ModelInputs, MoTTransformer, routing
from mot.model.kernels import Kernels
from mot.model.pattention import TowerPattention
from mot.model.reference import mask_routed_forward
from mot.train.optim import parameter_groups
from tests.conftest import randomize_norms, tiny_config


def pattention_config(**overrides):
    return tiny_config(**{"projection": "pattention", "param_tokens": 12, **overrides})


def _gelu_by_hand(z: float) -> float:
    return 0.5 * z * (1 + math.erf(z / math.sqrt(2)))


def _reference_rows(x, modality, keys, values, n_tokens, tau_tokens):
    """Every row on its own, every sum as a Python loop: Theta(S)_k = GeLU(S_k sqrt(n_tau) / ||S||_2)."""
    out = torch.zeros(x.shape[0], values.shape[-1], dtype=torch.float64)
    for j in range(x.shape[0]):
        t = int(modality[j])
        scores = [float(x[j] @ keys[t, k]) for k in range(n_tokens[t])]
        norm = math.sqrt(sum(s * s for s in scores))
        for k, s in enumerate(scores):
            out[j] += _gelu_by_hand(s * math.sqrt(tau_tokens[t]) / norm) * values[t, k]
    return out


@pytest.mark.parametrize("kernels", ["per_tower", "grouped"])
@pytest.mark.parametrize("tokens", [[6, 6, 6], [6, 3, 8]])
def test_tower_pattention_equals_a_per_token_loop_float64(kernels, tokens, generator):
    taus = [4, 3, 8]
    layer = TowerPattention(3, 8, 16, tokens, taus).double()
    layer.reset_parameters(0.5, 0.5)
    modality = torch.randint(3, (2, 11), generator=generator)
    modality[0, :2] = 1  # every tower gets rows
    x = torch.randn(22, 8, generator=generator, dtype=torch.float64)
    route = routing.route_tokens(modality, 3).with_kernels(Kernels(kernels))
    ours = route.unsort(layer(route.sort(x), route))
    ref = _reference_rows(x, modality.reshape(-1), layer.keys.detach(), layer.values.detach(), tokens, taus)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_padding_tokens_stay_zero_and_get_no_gradient(generator):
    """Towers with fewer tokens than the widest are padded; the padded rows are inert on both paths."""
    layer = TowerPattention(3, 8, 8, [6, 3, 8], [6, 3, 8]).double()
    layer.reset_parameters(0.5, 0.5)
    modality = torch.arange(3).repeat_interleave(5)
    route = routing.route_tokens(modality, 3)
    x = torch.randn(15, 8, generator=generator, dtype=torch.float64)
    for kernels in ("per_tower", "grouped"):
        layer.zero_grad()
        layer(route.sort(x), route.with_kernels(Kernels(kernels))).square().sum().backward()
        for t, n in enumerate(layer.n_tokens):
            assert torch.count_nonzero(layer.keys.grad[t, n:]) == 0
            assert torch.count_nonzero(layer.values.grad[t, n:]) == 0
            assert layer.keys.grad[t, :n].abs().sum() > 0


def test_grouped_path_over_padded_towers_equals_split_path(generator):
    """torch._grouped_mm (forced on the CPU, float32) runs over the padded width; the split path slices."""
    layer = TowerPattention(3, 16, 24, [8, 16, 8], [8, 16, 8])
    layer.reset_parameters(0.3, 0.3)
    modality = torch.randint(3, (40,), generator=generator)
    route = routing.route_tokens(modality, 3)
    x = torch.randn(40, 16, generator=generator)
    results = []
    for kernels in ("per_tower", "grouped"):
        layer.zero_grad()
        out = layer(route.sort(x), route.with_kernels(Kernels(kernels)))
        out.square().sum().backward()
        results.append((out.detach(), layer.keys.grad.clone(), layer.values.grad.clone()))
    for split, grouped in zip(*results, strict=True):
        # Summation order differs between the two kernels (and across CPUs): float32 noise, scaled to the tensor.
        torch.testing.assert_close(grouped, split, rtol=1e-4, atol=1e-5 * split.abs().max().item())
    assert torch.count_nonzero(results[1][1][0, 8:]) == 0  # padding: no gradient on the grouped path either


def test_zero_key_tokens_keep_the_function_only_with_tau_kept(generator):
    """The growth rule at one layer: tokens with zero keys (any values) add nothing while tau stays sqrt(n_old)."""
    small = TowerPattention(1, 8, 8, [5], [5]).double()
    small.reset_parameters(0.5, 0.5)
    kept = TowerPattention(1, 8, 8, [9], [5]).double()
    recomputed = TowerPattention(1, 8, 8, [9], [9]).double()
    for big in (kept, recomputed):
        with torch.no_grad():
            big.values.normal_(generator=generator)
            big.keys.zero_()
            big.keys[:, :5], big.values[:, :5] = small.keys, small.values
    x = torch.randn(7, 8, generator=generator, dtype=torch.float64)
    route = routing.route_tokens(torch.zeros(7, dtype=torch.long), 1, permute=False)
    torch.testing.assert_close(kept(x, route), small(x, route), rtol=0, atol=1e-14)
    assert not torch.allclose(recomputed(x, route), small(x, route))  # TokenFormer's sqrt(n) moves it


LAYOUTS = {"all three": [0, 1, 2], "no image": [0, 2]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", ["uniform", "per modality", "attn shared", "chameleon qk_norm", "dense"])
def test_mot_with_pattention_equals_mask_reference_float64(layout, variant, generator):
    cfg = {
        "uniform": pattention_config(),
        "per modality": pattention_config(param_tokens_per_modality=[12, 5, 9], param_tokens_tau=[10, 5, 4]),
        "attn shared": pattention_config(untie=["ffn", "norm"]),
        "chameleon qk_norm": pattention_config(norm_placement="chameleon", qk_norm=True),
        "dense": pattention_config(untie=[]),
    }[variant]
    model = MoTTransformer(cfg).double()
    randomize_norms(model, generator)
    tokens = tokens_for_layout(random_layout(2, 30, LAYOUTS[layout], 7, generator), model.vocab, generator)
    weights = torch.randn(2, 30, model.vocab.size, generator=generator, dtype=torch.float64)
    grads = []
    for forward in (lambda t: model(ModelInputs(t)).logits, lambda t: mask_routed_forward(model, t)):
        model.zero_grad(set_to_none=True)
        logits = forward(tokens)
        (logits * weights).sum().backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ours, our_grads), (ref, ref_grads) = grads
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    for name in ref_grads:
        torch.testing.assert_close(our_grads[name], ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_linear_recipe_builds_the_same_model_as_before():
    """projection = "linear" is the default: same parameter names, shapes and initial values."""
    torch.manual_seed(0)
    default = MoTTransformer(tiny_config())
    torch.manual_seed(0)
    explicit = MoTTransformer(tiny_config(projection="linear"))
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values(),
                                                  strict=True))
    assert not any("keys" in n for n in default.state_dict())


# ---------------------------------------------------------------- sizes


PATTENTION_CONFIGS = {
    "uniform": pattention_config(dim=64, param_tokens=24),
    "per modality": pattention_config(dim=64, param_tokens_per_modality=[24, 8, 16]),
    "attn shared, tied embeddings": pattention_config(dim=64, untie=["ffn"], tie_embeddings=True),
    "dense": pattention_config(dim=64, untie=[], param_tokens=0, ffn_token_multiple=2),
}


@pytest.mark.parametrize("name", list(PATTENTION_CONFIGS))
def test_pattention_param_count_matches_model(name):
    cfg = PATTENTION_CONFIGS[name]
    model = MoTTransformer(cfg)
    # Padding rows (towers holding fewer tokens than the widest) are storage, not parameters.
    padding = sum(p[t, n:].numel() for m in model.modules() if isinstance(m, TowerPattention)
                  for p in (m.keys, m.values) for t, n in enumerate(m.n_tokens))
    assert param_counts(cfg)[0] == sum(p.numel() for p in model.parameters()) - padding


def test_pattention_hand_computed_params():
    """d=64, 24 tokens: QKV 24 * (64 + 192), output 24 * (64 + 64), FFN 96 tokens * (64 + 64)."""
    cfg = PATTENTION_CONFIGS["uniform"]
    report = size_report(cfg, 64)
    layer = 24 * 256 + 24 * 128 + 96 * 128 + 2 * 64
    assert report.tower_params == 2 * layer + 64


# The grouped path computes the zero padding of uneven towers too, so those are checked on the split path only.
FLOPS_CASES = [(name, kernels) for name, cfg in PATTENTION_CONFIGS.items() for kernels in ("per_tower", "grouped")
               if not (kernels == "grouped" and cfg.param_tokens_per_modality)]


@pytest.mark.parametrize(("name", "kernels"), FLOPS_CASES)
def test_pattention_flops_match_flop_counter(name, kernels, generator):
    """2 n (in + out) per projection and token, counted per modality (towers may differ) against the counter."""
    cfg = dataclasses.replace(PATTENTION_CONFIGS[name], kernels=kernels)
    batch, seq_len = 2, 64
    model = MoTTransformer(cfg)
    layout = random_layout(batch, seq_len, [0, 1, 2], 12, generator)
    tokens = tokens_for_layout(layout, model.vocab, generator)
    with flop_counter() as counter, sdpa_kernel(SDPBackend.MATH):
        model(ModelInputs(tokens)).logits.float().square().mean().backward()
    report = size_report(cfg, seq_len, attention="full")
    predicted = sum(int((layout == m).sum()) * report.flops_forward_backward[mod.name]
                    for m, mod in enumerate(cfg.modalities))
    assert counter.get_total_flops() == pytest.approx(predicted, rel=0.02)


def test_parameter_tokens_are_weight_decayed():
    model = MoTTransformer(pattention_config())
    decay, _ = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "blocks.0.ffn.proj.keys" in decayed and "blocks.1.attn.qkv.values" in decayed


# ---------------------------------------------------------------- config


def _data(**model) -> dict:
    data = config_to_dict(RunConfig(model=tiny_config()))
    data["model"].update(model)
    data["train"]["seq_len"] = 32  # within tiny_config's max_seq_len
    return data


@pytest.mark.parametrize("model, match", [
    ({"param_tokens": 16}, r"'model.param_tokens' only applies with model.projection = 'pattention'"),
    ({"param_tokens_tau": [4, 4, 4]}, r"'model.param_tokens_tau' only applies"),
    ({"projection": "pattention", "param_tokens": -1}, r"'model.param_tokens' must be >= 0"),
    ({"projection": "pattention", "ffn_token_multiple": 0}, r"'model.ffn_token_multiple' must be at least 1"),
    ({"projection": "pattention", "param_tokens_per_modality": [8, 8]},
     r"'model.param_tokens_per_modality' needs one count per modality \['text', 'image', 'speech'\]"),
    ({"projection": "pattention", "param_tokens_per_modality": [8, 0, 8]},
     r"'model.param_tokens_per_modality.1' must be positive"),
    ({"projection": "pattention", "param_tokens_per_modality": [8, 4, 8], "untie": ["ffn", "norm"]},
     r"differs between modalities .* \['attn'\] projections are shared"),
    ({"projection": "tokenformer"}, r"'model.projection' must be one of \['linear', 'pattention'\]"),
])
def test_bad_pattention_config_names_the_key(model, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(_data(**model), "recipe.toml")


def test_pattention_config_round_trips():
    cfg = config_from_dict(_data(projection="pattention", param_tokens_per_modality=[8, 4, 8]), "recipe.toml")
    assert cfg.model.param_tokens_of("attn", 1) == 4 and cfg.model.param_tokens_of("ffn", 1) == 16
    assert cfg.model.tau_tokens_of("ffn", 2) == 32
    again = config_from_dict(config_to_dict(cfg), "again")
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
