"""The kernel choice (mot.model.kernels): the recipe's `model.kernels` decides which matmul runs the tower
projections, every choice computes the same, and the master-weights hook on `TowerLinear`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mot.config import ConfigError, load_config
from mot.data.synthetic import random_layout, tokens_for_layout
from mot.model import ModelInputs, MoTTransformer, routing
from mot.model import kernels as model_kernels
from mot.model.kernels import AUTO, Kernels
from tests.conftest import Counter, randomize_norms, tiny_config

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.toml"



@pytest.fixture
def calls(monkeypatch) -> dict[str, Counter]:
    """Counts of the grouped-matmul and per-tower-GEMM calls made by the projections."""
    grouped, per_tower = Counter(torch._grouped_mm), Counter(model_kernels.tower_mm)
    monkeypatch.setattr(torch, "_grouped_mm", grouped)
    monkeypatch.setattr(model_kernels, "tower_mm", per_tower)
    return {"grouped": grouped, "per_tower": per_tower}


def _logits_and_grads(model: MoTTransformer, tokens: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(ModelInputs(tokens)).logits
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# On the CPU every route counts its towers on the host, so "auto" and "per_tower" take the per-tower GEMMs.
RAN = {"auto": "per_tower", "per_tower": "per_tower", "grouped": "grouped", "split": None}


def test_the_recipe_picks_the_kernel_and_every_kernel_computes_the_same(calls, generator):
    """float32 on the CPU, where `torch._grouped_mm` runs when forced: the logits and every gradient of each
    choice equal those of the split + matmul path, and only the chosen kernel ran."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = MoTTransformer(cfg)
    randomize_norms(model, generator)
    tokens = tokens_for_layout(random_layout(2, 40, [0, 1, 2], 9, generator), model.vocab, generator)
    results = {}
    for choice, kernel in RAN.items():
        with torch.device("meta"):
            recipe_model = MoTTransformer(load_config(RECIPE, [f"--model.kernels={choice}"]).model)
        assert recipe_model.kernels == Kernels(choice)
        chosen = MoTTransformer(tiny_config(kernels=choice))
        chosen.load_state_dict(model.state_dict())
        assert chosen.route(chosen.vocab.modality_of(tokens)).kernels.matmul == choice
        before = {name: c.calls for name, c in calls.items()}
        results[choice] = _logits_and_grads(chosen, tokens)
        ran = {name for name, c in calls.items() if c.calls > before[name]}
        assert ran == ({kernel} if kernel else set()), (choice, ran)
    split_logits, split_grads = results["split"]
    for choice, (logits, grads) in results.items():
        torch.testing.assert_close(logits, split_logits, rtol=1e-5, atol=1e-6, msg=choice)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, split_grads[name], rtol=1e-4, atol=1e-6, msg=f"{choice} {name}")


def test_a_bad_kernel_choice_names_the_key():
    with pytest.raises(ConfigError, match=r"'model\.kernels' must be one of \['auto', 'per_tower', 'grouped', "
                                          r"'split'\], got 'fast'"):
        load_config(RECIPE, ["--model.kernels=fast"])
    with pytest.raises(ValueError, match=r"Kernels.matmul must be one of .* got 'never'"):
        Kernels("never")


def test_the_default_is_auto_everywhere():
    assert load_config(RECIPE).model.kernels == "auto"
    assert MoTTransformer(tiny_config()).kernels == AUTO == Kernels()
    route = routing.route_tokens(torch.tensor([[2, 0, 1]]), 3)
    assert route.kernels is AUTO
    grouped = route.with_kernels(Kernels("grouped"))
    assert grouped.kernels.matmul == "grouped" and route.kernels is AUTO  # a new route; the old one unchanged
    assert torch.equal(grouped.order, route.order)


def test_kernel_decisions_on_the_cpu():
    """Which kernel each choice takes for given operands (the CPU: per tower wherever the counts are on the
    host; grouped only when forced, and only for bf16/fp32 operands of aligned widths)."""
    x, weight, counts = torch.zeros(10, 16), torch.zeros(3, 8, 16), torch.tensor([3, 3, 4])
    tiny = Kernels(per_tower_min_macs=10**30)  # the threshold is for CUDA only
    assert tiny.per_tower(x, weight, counts) and Kernels("per_tower").per_tower(x, weight, counts)
    assert not any(Kernels(c).per_tower(x, weight, counts) for c in ("grouped", "split"))
    assert not any(Kernels(c).per_tower(x, weight, None) for c in ("auto", "per_tower"))  # no host counts
    assert Kernels("grouped").grouped(x, weight) and Kernels("grouped").grouped(x.bfloat16(), weight.bfloat16())
    assert not Kernels("grouped").grouped(x.double(), weight.double())
    assert not Kernels("grouped").grouped(torch.zeros(10, 12), torch.zeros(3, 8, 12))  # misaligned rows
    assert not any(Kernels(c).grouped(x.bfloat16(), weight.bfloat16()) for c in ("auto", "per_tower", "split"))


# ---------------------------------------------------------------- the master-weights hook


def test_tower_linear_accumulates_its_weight_gradient_into_a_sum_when_asked(generator):
    """`accumulate_gradients_into`: two backward passes add into the fp32 sum (the weight gets no .grad) and
    equal the two ordinary gradients summed; None gives the weight its .grad again."""
    layer = routing.TowerLinear(3, 8, 4)
    torch.nn.init.normal_(layer.weight, generator=generator)
    modality = torch.randint(3, (2, 7), generator=generator)
    route = routing.route_tokens(modality, 3)
    xs = [torch.randn(14, 8, generator=generator) for _ in range(2)]
    expected = torch.zeros_like(layer.weight)
    for x in xs:
        layer(x, route).square().sum().backward()
        expected += layer.weight.grad
        layer.weight.grad = None
    total = torch.zeros_like(layer.weight)
    layer.accumulate_gradients_into(total)
    for x in xs:
        layer(x, route).square().sum().backward()
    assert layer.weight.grad is None
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    layer.accumulate_gradients_into(None)
    layer(xs[0], route).square().sum().backward()
    assert layer.weight.grad is not None
    with pytest.raises(ValueError, match="gradient sum of shape"):
        layer.accumulate_gradients_into(torch.zeros(3, 4, 7))
