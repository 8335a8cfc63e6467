"""Routing's CUDA kernels against the float64 mask-routed oracle (mot.model.reference): logits and every
gradient, for each way a projection can run on the GPU.

- grouped: bf16 weights, no host counts -> one `torch._grouped_mm` per projection (Hopper);
- per tower: host counts and `Kernels("per_tower")` (or projections above `per_tower_min_macs`) -> one cuBLAS
  GEMM per tower (tower_mm);
- the switch between the two at `Kernels.per_tower_min_macs` ("auto"): both kernels in one model;
- autocast over fp32 weights (the fp32-weights training mode), grouped and per tower;
- fp32 weights without autocast, per tower and split (TF32 off: exact up to fp32 rounding);
- the master-weights path: bf16 weights whose backward adds each micro-batch's weight gradient into an fp32
  sum inside the GEMM (`addmm.dtype_out`, CUDA only), over two micro-batches.

Each test also checks which kernel ran (a counting wrapper), so a test cannot pass on the wrong path.
Errors are relative Frobenius norms against the oracle, ||ours - oracle|| / ||oracle||. The bf16 tolerance
sits a few times above what bf16 rounding gives here, and far below the error of a routing mistake, which
each test measures too: the same weights with the towers' order rotated are ~100% off.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch

from mot.data.synthetic import random_layout, tokens_for_layout
from mot.model import ModelInputs, MoTTransformer, routing
from mot.model import kernels as model_kernels
from mot.model.kernels import Kernels
from mot.model.reference import mask_routed_forward
from mot.train.master_weights import MasterWeightAdamW
from mot.train.optim import parameter_groups
from tests.conftest import Counter, randomize_norms, tiny_config

DEVICE = torch.device("cuda")
# Relative Frobenius error against the float64 oracle. bf16: the worst tensor (a q/k-norm gain's gradient) was
# 1.4-1.5e-2 off with the CPU's bf16 kernels; fp32: 6e-7.
TOLERANCE = {torch.bfloat16: 4e-2, torch.float32: 1e-5}
WRONG_ROUTE_MIN_ERROR = 0.3  # a tower mix-up is at least this far off, so the tolerances above can tell


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 off: fp32 paths are then held to fp32 rounding."""
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    yield
    torch.backends.cuda.matmul.fp32_precision = before



@pytest.fixture
def kernels(monkeypatch):
    """Counts of the grouped-matmul and per-tower-GEMM calls made by the projections (mot.model.kernels)."""
    grouped, per_tower = Counter(torch._grouped_mm), Counter(model_kernels.tower_mm)
    monkeypatch.setattr(torch, "_grouped_mm", grouped)
    monkeypatch.setattr(model_kernels, "tower_mm", per_tower)
    return {"grouped": grouped, "per_tower": per_tower}


def make_model(seed: int = 0, **overrides) -> MoTTransformer:
    """A small 3-tower MoT whose towers differ in every parameter (norm gains included); every width a multiple
    of 8, which the grouped matmul needs."""
    torch.manual_seed(seed)
    cfg = tiny_config(dim=64, n_heads=4, ffn_dim=128, max_seq_len=256, qk_norm=True, **overrides)
    model = MoTTransformer(cfg)
    randomize_norms(model, torch.Generator().manual_seed(seed))
    return model


def batch(model: MoTTransformer, seed: int, rows: int = 2, length: int = 200) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return tokens_for_layout(random_layout(rows, length, [0, 1, 2], 23, gen), model.vocab, gen)


def host_counts(model: MoTTransformer, tokens: torch.Tensor) -> tuple[int, ...]:
    modality = model.vocab.modality_of(tokens).reshape(-1)
    return tuple(int((modality == m).sum()) for m in range(model.cfg.n_modalities))


def loss_weights(shape: torch.Size) -> torch.Tensor:
    """A fixed random projection of the logits as the loss: every logit gets a nonzero gradient."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def oracle(model: MoTTransformer, token_batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    """float64 logits of each batch and the gradients summed over the batches, by mask routing on the CPU."""
    reference = copy.deepcopy(model).double().cpu()
    logits = []
    for tokens in token_batches:
        out = mask_routed_forward(reference, tokens)
        (out * loss_weights(out.shape)).sum().backward()
        logits.append(out.detach())
    return logits, {n: p.grad for n, p in reference.named_parameters()}


def ours(model: MoTTransformer, token_batches: list[torch.Tensor], counted: bool, autocast: bool = False):
    """Logits of each batch on the GPU, the model's parameters holding the summed gradients."""
    logits = []
    for tokens in token_batches:
        tokens = tokens.to(DEVICE)
        context = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else nullcontext()
        with context:
            out = model(ModelInputs(tokens, tower_counts=host_counts(model, tokens) if counted else None)).logits
        (out.double() * loss_weights(out.shape).to(DEVICE)).sum().backward()
        logits.append(out.detach().double().cpu())
    return logits


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double().cpu() - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_close_to_oracle(got_logits, got_grads: dict, ref_logits, ref_grads: dict, dtype: torch.dtype,
                           label: str) -> None:
    tolerance = TOLERANCE[dtype]
    errors = {f"logits {i}": relative_error(g, r) for i, (g, r) in enumerate(zip(got_logits, ref_logits, strict=True))}
    errors |= {name: relative_error(got_grads[name], ref_grads[name]) for name in ref_grads}
    worst = max(errors, key=errors.get)
    print(f"{label}: worst relative error {errors[worst]:.2e} ({worst}), tolerance {tolerance:.0e}")
    failing = {k: f"{v:.2e}" for k, v in errors.items() if v > tolerance}
    assert not failing, f"{label}: relative errors above {tolerance:.0e}: {failing}"


def assert_wrong_route_is_caught(model: MoTTransformer, tokens: torch.Tensor, ref_logits: torch.Tensor) -> None:
    """The oracle of a model whose towers are rotated (text weights on images, ...) is far from the true one."""
    rotated = copy.deepcopy(model).float().cpu()
    with torch.no_grad():
        for name, p in rotated.named_parameters():
            if name.startswith("blocks") and p.shape[0] == model.cfg.n_modalities:
                p.copy_(p.roll(1, dims=0))
    with torch.no_grad():
        error = relative_error(mask_routed_forward(rotated.double(), tokens), ref_logits)
    assert error > WRONG_ROUTE_MIN_ERROR, f"rotated towers only {error:.2e} off: the test could not see a mix-up"


def gradients(model: MoTTransformer) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kv_heads", [0, 2])
@pytest.mark.parametrize("path", ["grouped", "per_tower"])
def test_bf16_routing_equals_float64_oracle(path, kv_heads, kernels):
    model = make_model(n_kv_heads=kv_heads, kernels="per_tower")  # every projection per tower where counted
    tokens = [batch(model, seed=1)]
    ref_logits, ref_grads = oracle(model, tokens)
    assert_wrong_route_is_caught(model, tokens[0], ref_logits[0])
    gpu = copy.deepcopy(model).to(DEVICE, torch.bfloat16)
    logits = ours(gpu, tokens, counted=path == "per_tower")
    assert kernels[path].calls > 0 and kernels["grouped" if path == "per_tower" else "per_tower"].calls == 0
    assert_close_to_oracle(logits, gradients(gpu), ref_logits, ref_grads, torch.bfloat16, f"bf16 {path}")


def test_per_tower_min_macs_switch_mixes_kernels_in_one_model(kernels):
    """With host counts, each projection picks its kernel by its size: with the threshold between the model's
    smallest and largest projections, both kernels run in one forward and backward, and the result equals the
    oracle. (Which side the recipes' projections fall on: tests/test_tower_matmul.py.)"""
    model = make_model()
    tokens = [batch(model, seed=2)]
    rows = tokens[0].numel()
    sizes = sorted(rows * m.weight.shape[1] * m.weight.shape[2]
                   for m in model.modules() if isinstance(m, routing.TowerLinear))
    assert sizes[0] < sizes[-1]
    ref_logits, ref_grads = oracle(model, tokens)
    gpu = copy.deepcopy(model).to(DEVICE, torch.bfloat16)
    gpu.kernels = Kernels("auto", per_tower_min_macs=sizes[-1])
    logits = ours(gpu, tokens, counted=True)
    assert kernels["per_tower"].calls > 0 and kernels["grouped"].calls > 0, {k: c.calls for k, c in kernels.items()}
    assert_close_to_oracle(logits, gradients(gpu), ref_logits, ref_grads, torch.bfloat16, "mixed kernels")


@pytest.mark.parametrize("counted", [False, True])
def test_autocast_over_fp32_weights_equals_oracle(counted, kernels):
    """The fp32-weights training mode: the projections cast to bf16 as F.linear would under autocast, and the
    fp32 weights get their gradients."""
    model = make_model(kernels="per_tower")
    tokens = [batch(model, seed=3)]
    ref_logits, ref_grads = oracle(model, tokens)
    gpu = copy.deepcopy(model).to(DEVICE)
    logits = ours(gpu, tokens, counted=counted, autocast=True)
    assert kernels["per_tower" if counted else "grouped"].calls > 0
    assert all(p.grad.dtype == torch.float32 for p in gpu.parameters())
    assert_close_to_oracle(logits, gradients(gpu), ref_logits, ref_grads, torch.bfloat16, f"autocast {counted=}")


@pytest.mark.parametrize("counted", [False, True])
def test_fp32_routing_equals_oracle(counted, kernels):
    """fp32 weights without autocast: per-tower GEMMs (counted) or split + matmul; no grouped matmul (bf16)."""
    model = make_model(n_kv_heads=2, kernels="per_tower")
    tokens = [batch(model, seed=4)]
    ref_logits, ref_grads = oracle(model, tokens)
    gpu = copy.deepcopy(model).to(DEVICE)
    logits = ours(gpu, tokens, counted=counted)
    assert kernels["grouped"].calls == 0 and (kernels["per_tower"].calls > 0) == counted
    assert_close_to_oracle(logits, gradients(gpu), ref_logits, ref_grads, torch.float32, f"fp32 {counted=}")


def test_master_weight_gradients_accumulate_in_fp32_inside_the_gemm(kernels, monkeypatch):
    """Two micro-batches (under autocast, as in training) through bf16 weights whose backward adds into fp32
    sums (`addmm.dtype_out`): the sums equal the oracle's summed float64 gradients, the weights get no `.grad`,
    and the other parameters' `.grad` hold the sum as usual."""
    dtype_out = Counter(torch.ops.aten.addmm.dtype_out)
    monkeypatch.setattr(torch.ops.aten.addmm, "dtype_out", dtype_out)
    model = make_model(kernels="per_tower")
    tokens = [batch(model, seed=5), batch(model, seed=6)]
    ref_logits, ref_grads = oracle(model, tokens)
    gpu = copy.deepcopy(model).to(DEVICE)
    optimizer = MasterWeightAdamW(gpu, parameter_groups(gpu, 0.1), lr=1e-3)
    optimizer.accumulate_in_backward(gpu)
    logits = ours(gpu, tokens, counted=True, autocast=True)  # as the trainer runs it: the embeddings stay fp32
    assert dtype_out.calls > 0 and kernels["per_tower"].calls > 0
    names = {p: n for n, p in gpu.named_parameters()}
    summed = {names[p]: s for p, s in optimizer.backward_sums.items()}
    assert summed and all(gpu.get_parameter(n).grad is None for n in summed)
    assert all(s.dtype == torch.float32 for s in summed.values())
    grads = {n: summed.get(n, p.grad) for n, p in gpu.named_parameters()}
    assert_close_to_oracle(logits, grads, ref_logits, ref_grads, torch.bfloat16, "master-weight sums")
