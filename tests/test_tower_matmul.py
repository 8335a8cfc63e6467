"""The per-tower GEMM op (mot.model.tower_matmul) against a per-row float64 loop, and under torch.compile."""

from __future__ import annotations

import pytest
import torch

from mot.model import MoTTransformer, routing
from mot.model.block import AttentionInputs
from mot.model.kernels import Kernels
from mot.model.rope import RotaryEmbedding
from mot.model.tower_matmul import tower_mm, tower_mm_backward_into, tower_mm_into
from tests.conftest import tiny_config


def _per_row_reference(x, weight, tower_of_row):
    return torch.stack([weight[t] @ row for row, t in zip(x, tower_of_row.tolist(), strict=True)])


@pytest.mark.parametrize("counts", [[3, 5, 2], [4, 0, 6], [0, 10, 0]])
def test_tower_mm_forward_and_gradients_equal_a_per_row_loop_float64(counts, generator):
    x = torch.randn(10, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    tower_of_row = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    dy = torch.randn(10, 4, generator=generator, dtype=torch.float64)

    ours = tower_mm(x, weight, torch.tensor(counts))
    grad_x, grad_w = torch.autograd.grad(ours, (x, weight), dy)
    ref = _per_row_reference(x, weight, tower_of_row)
    ref_grad_x, ref_grad_w = torch.autograd.grad(ref, (x, weight), dy)

    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_w, ref_grad_w, rtol=1e-12, atol=1e-12)
    for tower, n in enumerate(counts):  # a tower without rows: exactly zero, not uninitialised memory
        if n == 0:
            assert torch.count_nonzero(grad_w[tower]) == 0


def test_tower_mm_ops_pass_opcheck(generator):
    """Schema, mutation and fake (meta) implementation as torch.compile relies on them, for both ops and both
    ways the backward treats the weight gradient (written, or added into an fp32 sum)."""
    x = torch.randn(9, 8, generator=generator)
    weight = torch.randn(3, 5, 8, generator=generator)
    grad = torch.randn(9, 5, generator=generator)
    for counts in ([2, 4, 3], [9, 0, 0]):
        counts = torch.tensor(counts)
        torch.library.opcheck(tower_mm_into, (x, weight, counts, torch.empty(9, 5)))
        for grad_weight, accumulate in ((torch.empty(3, 5, 8), False), (torch.zeros(3, 5, 8), True)):
            torch.library.opcheck(tower_mm_backward_into,
                                  (grad, x, weight, counts, torch.empty(9, 8), grad_weight, accumulate))


def test_tower_mm_rejects_counts_that_do_not_partition_the_rows():
    with pytest.raises(ValueError, match="do not partition 5 rows"):
        tower_mm(torch.randn(5, 2), torch.randn(2, 3, 2), torch.tensor([2, 2]))


def test_compiled_block_takes_new_modality_mixes_without_recompiling(generator):
    """The slice sizes reach the ops as a CPU tensor: new counts are data, not a new graph."""
    cfg = tiny_config(dim=32, n_heads=4)
    block = MoTTransformer(cfg).blocks[0]  # initialised weights
    rope = RotaryEmbedding(cfg.head_dim, 64, cfg.rope_theta)
    compiled = torch.compile(block, fullgraph=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            modality = torch.randint(0, 3, (2, 16), generator=torch.Generator().manual_seed(seed))
            counts = torch.bincount(modality.reshape(-1), minlength=3)  # as the trainer counts its CPU batch
            route = routing.route_tokens(modality, 3, host_counts=counts)
            cos, sin = rope(16, None)
            x = torch.randn(32, 32, generator=generator, requires_grad=True)
            out = compiled(x, route, AttentionInputs(2, 16, cos, sin))
            out.sum().backward()
            eager_x = x.detach().clone().requires_grad_()
            eager = block(eager_x, route, AttentionInputs(2, 16, cos, sin))
            eager.sum().backward()
            torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x.grad, eager_x.grad, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_backward_accumulates_weight_gradients_into_fp32_sums(generator):
    """bf16 operands, fp32 sums over two backward passes: the float64 sum of the per-row products of the same bf16
    values (to fp32 rounding); the weight gets no .grad and the input gradient is the ordinary one."""
    counts = torch.tensor([4, 0, 7])
    tower_of_row = torch.repeat_interleave(torch.arange(3), counts)
    weight = torch.randn(3, 5, 6, generator=generator).bfloat16().requires_grad_()
    grad_sum = torch.zeros(3, 5, 6)
    expected = torch.zeros(3, 5, 6, dtype=torch.float64)
    for _ in range(2):
        x = torch.randn(11, 6, generator=generator).bfloat16().requires_grad_()
        dy = torch.randn(11, 5, generator=generator).bfloat16()
        tower_mm(x, weight, counts, grad_sum).backward(dy)
        for row, tower in enumerate(tower_of_row.tolist()):
            expected[tower] += torch.outer(dy[row].double(), x[row].detach().double())
        plain_x = x.detach().requires_grad_()
        tower_mm(plain_x, weight.detach(), counts).backward(dy)
        assert torch.equal(x.grad, plain_x.grad)
    assert weight.grad is None
    torch.testing.assert_close(grad_sum.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(grad_sum[1]) == 0


def test_route_takes_host_counts_from_the_caller_and_checks_them():
    modality = torch.tensor([[2, 0, 1, 0], [1, 2, 0, 0]])
    counts = torch.bincount(modality.reshape(-1), minlength=3)
    assert routing.route_tokens(modality, 3, host_counts=counts).host_counts.tolist() == [4, 2, 2]
    assert routing.route_tokens(modality, 3).host_counts.tolist() == [4, 2, 2]  # a CPU route counts itself
    assert routing.route_tokens(modality, 3, host_counts=(4, 2, 2)).host_counts.tolist() == [4, 2, 2]  # as DDP/FSDP
    with pytest.raises(ValueError, match="host_counts must hold 3 tower counts"):
        routing.route_tokens(modality, 3, host_counts=counts[:2])
    with pytest.raises(ValueError, match=r"host_counts \[2, 4, 2\] do not match the modalities \[4, 2, 2\]"):
        routing.route_tokens(modality, 3, host_counts=(2, 4, 2))


def test_batches_carry_host_counts_through_the_move_to_a_device():
    from mot.data.loader import PackedBatch

    modality = torch.tensor([[0, 2, 2, 1], [2, 2, 0, 0]])
    batch = PackedBatch(modality, modality, modality, modality).counted(4)
    assert batch.tower_counts == (3, 1, 4, 0)
    assert batch.to("cpu").tower_counts is batch.tower_counts


@pytest.mark.parametrize("recipe, expected", [("recipes/demo_gpu.toml", "grouped"),
                                              ("recipes/paper/chameleon_1_5b.toml", "per_tower")])
def test_per_tower_threshold_sits_between_the_demo_and_the_1b_recipe(recipe, expected):
    """On CUDA the recipes' kernels ("auto") give a projection one GEMM per tower from `per_tower_min_macs`
    multiply-accumulates up: every projection of the host-bound demo_gpu recipe stays under it (grouped kernel),
    every one of the ~1B recipe is over it (per-tower GEMMs). tests/gpu/test_routing_gpu.py checks both kernels
    against the oracle."""
    from mot.config import load_config

    cfg = load_config(recipe)
    rows = (cfg.train.micro_batch_size or cfg.train.batch_size) * cfg.train.seq_len
    with torch.device("meta"):
        model = MoTTransformer(cfg.model)
    sizes = [rows * m.weight.shape[1] * m.weight.shape[2]
             for m in model.modules() if isinstance(m, routing.TowerLinear)]
    assert cfg.model.kernels == "auto"
    threshold = Kernels(cfg.model.kernels).per_tower_min_macs
    if expected == "grouped":
        assert max(sizes) < threshold
    else:
        assert min(sizes) >= threshold
