"""The master-weight AdamW update compiled on CUDA (one fused kernel per tensor) against the same function run
eagerly, and against torch.optim.AdamW on the fp32 values over several steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mot.train import master_weights
from mot.train.master_weights import MasterWeightAdamW, adamw_update_many
from mot.train.optim import clip_gradients, parameter_groups

DEVICE = torch.device("cuda")
SHAPES = [(64, 48), (48,), (3, 40, 24), (1,)]


def scalars(lr: float, step: int, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1) -> torch.Tensor:
    beta1, beta2 = betas
    values = [1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps, lr / (1 - beta1**step),
              (1 - beta2**step) ** 0.5]
    return torch.tensor(values, dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_compiled_update_equals_eager(grad_dtype):
    """Three steps of the compiled update and of the eager one from the same state: masters and moments agree
    to fp32 rounding, and each bf16 compute copy is exactly its master rounded."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rand = lambda shape, dtype=torch.float32: torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
    state = {"params": [rand(s) for s in SHAPES], "avgs": [rand(s) * 0.1 for s in SHAPES],
             "avg_sqs": [rand(s).square() * 0.01 for s in SHAPES]}
    copies = {name: [t.clone() for t in tensors] for name, tensors in state.items()}
    compute = [p.to(torch.bfloat16) for p in state["params"]]
    compute_copies = [p.clone() for p in compute]
    master_weights._compiled_update = None
    compiled = master_weights._update_fn(DEVICE)
    assert compiled is not adamw_update_many, "on CUDA the update is compiled"
    for step in (1, 2, 3):
        grads = [rand(s, grad_dtype) * 3 for s in SHAPES]
        inv_scale = torch.tensor(0.5, device=DEVICE)
        compiled(state["params"], grads, state["avgs"], state["avg_sqs"], scalars(1e-2, step), inv_scale, compute)
        adamw_update_many(copies["params"], grads, copies["avgs"], copies["avg_sqs"], scalars(1e-2, step),
                          inv_scale, compute_copies)
    for name in state:
        for got, expected in zip(state[name], copies[name], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)  # 1e-4 of a step (lr)
    for bf16, master in zip(compute, state["params"], strict=True):
        assert torch.equal(bf16, master.to(torch.bfloat16))
    exact = sum(int(torch.equal(a, b)) for a, b in zip(state["params"], copies["params"], strict=True))
    print(f"compiled vs eager ({grad_dtype}): {exact} of {len(SHAPES)} masters bit-identical")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.proj = nn.Linear(16, 24)
        self.out = nn.Linear(24, 8, bias=False)
        self.gain = nn.Parameter(torch.ones(8))


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipped, and left alone
def test_master_weight_adamw_on_cuda_follows_torch_adamw(max_norm):
    """MasterWeightAdamW's compiled CUDA steps follow torch.optim.AdamW (single-tensor) on the fp32 values given
    the same gradients; the model's bf16 weights are the masters rounded."""
    torch.manual_seed(0)
    reference = _Tiny().to(DEVICE)
    for p in reference.parameters():
        nn.init.normal_(p)
    ours = copy.deepcopy(reference)
    opt_ref = torch.optim.AdamW(parameter_groups(reference, 0.1), lr=0.05, betas=(0.9, 0.95), foreach=False)
    opt = MasterWeightAdamW(ours, parameter_groups(ours, 0.1), lr=0.05, betas=(0.9, 0.95))
    master_weights._compiled_update = None
    named_ref = dict(reference.named_parameters())
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    for _ in range(4):
        for name, p in ours.named_parameters():
            g = (3 * torch.randn(p.shape, generator=gen, device=DEVICE)).to(p.dtype)
            p.grad = g
            named_ref[name].grad = g.float().clone()
        norm_ref = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        norm = clip_gradients(opt, ours.parameters(), max_norm)
        assert float(norm) == pytest.approx(float(norm_ref), rel=1e-5)
        opt_ref.step()
        opt.step()
    assert master_weights._compiled_update is not None, "the steps took the compiled update"
    masters = opt.master_state_dict()
    assert masters, "the projections have fp32 masters"
    for name, p in ours.named_parameters():
        value = masters.get(name, p)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, named_ref[name].detach(), rtol=1e-5, atol=1e-6, msg=name)
        if name in masters:
            assert torch.equal(p, value.to(torch.bfloat16))
