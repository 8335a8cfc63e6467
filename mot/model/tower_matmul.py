"""Per-tower matmul on host-known slice sizes: one ordinary GEMM per tower, written into slices of one output.

Sorted rows make every tower one contiguous slice, so a projection is M plain GEMMs. With the slice sizes on the
host they are cuBLAS calls (on an H100 within 0-4% of one dense GEMM over all rows, where `torch._grouped_mm` is
4-13% slower: bench/tower_gemm.py). The op is opaque to torch.compile and takes the sizes as a CPU tensor, so a
new mix of modalities is neither a new graph nor a host sync inside the compiled blocks. Its backward writes the
input gradient into slices too and each tower's weight gradient into its row of one (M, out, in) tensor.

Gradient accumulation (master weights, several micro-batches per step): with `grad_sum`, an fp32 (M, out, in)
tensor, the backward adds each tower's weight gradient into it inside the GEMM (cuBLAS reads and writes the fp32
sum in its epilogue) and gives the weight no `.grad`: no bf16 gradient is written and none is read back to be
added into fp32 sums after the micro-batch.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula


def _slices(counts: Tensor, rows: int) -> list[tuple[int, int, int]]:
    """(tower, start, end) of every non-empty slice."""
    sizes = counts.tolist()
    if sum(sizes) != rows or min(sizes, default=0) < 0:
        raise ValueError(f"tower slice sizes {sizes} do not partition {rows} rows")
    out, start = [], 0
    for tower, size in enumerate(sizes):
        if size:
            out.append((tower, start, start + size))
        start += size
    return out


@torch.library.custom_op("mot::tower_mm", mutates_args=())
def tower_mm(x: Tensor, weight: Tensor, counts: Tensor, grad_sum: Tensor | None = None) -> Tensor:
    """y[rows of tower t] = x[rows of tower t] @ weight[t].T for sorted rows x (N, in), weight (M, out, in) and
    counts (M,): rows per tower, int64 on the CPU. grad_sum: where the backward accumulates the weight gradient
    (see the module docstring); the forward only keeps it for the backward."""
    x = x.contiguous()
    out = x.new_empty(x.shape[0], weight.shape[1])
    for tower, start, end in _slices(counts, x.shape[0]):
        torch.mm(x[start:end], weight[tower].t(), out=out[start:end])
    return out


@tower_mm.register_fake
def _(x: Tensor, weight: Tensor, counts: Tensor, grad_sum: Tensor | None = None) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("mot::tower_mm_backward", mutates_args=())
def tower_mm_backward(grad: Tensor, x: Tensor, weight: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """(grad of x, grad of weight). A tower without rows gets a zero weight gradient."""
    grad, x = grad.contiguous(), x.contiguous()
    grad_x = torch.empty_like(x)
    grad_weight = weight.new_empty(weight.shape)
    for tower, rows in enumerate(counts.tolist()):
        if rows == 0:  # no GEMM writes this tower's gradient
            grad_weight[tower].zero_()
    for tower, start, end in _slices(counts, x.shape[0]):
        torch.mm(grad[start:end], weight[tower], out=grad_x[start:end])
        torch.mm(grad[start:end].t(), x[start:end], out=grad_weight[tower])
    return grad_x, grad_weight


@tower_mm_backward.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), weight.new_empty(weight.shape)


def _accumulate_product(total: Tensor, a: Tensor, b: Tensor) -> None:
    """total += a @ b, accumulated in total's dtype."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
    elif total.is_cuda:  # bf16 operands, fp32 output and accumulator: one cuBLAS call, beta = 1
        torch.ops.aten.addmm.dtype_out(total, a, b, total.dtype, out=total)
    else:
        total.addmm_(a.to(total.dtype), b.to(total.dtype))


@torch.library.custom_op("mot::tower_mm_backward_accumulate", mutates_args=("grad_sum",))
def tower_mm_backward_accumulate(grad: Tensor, x: Tensor, weight: Tensor, counts: Tensor, grad_sum: Tensor
                                 ) -> Tensor:
    """Grad of x; grad_sum[t] += the weight gradient of tower t."""
    grad, x = grad.contiguous(), x.contiguous()
    grad_x = torch.empty_like(x)
    for tower, start, end in _slices(counts, x.shape[0]):
        torch.mm(grad[start:end], weight[tower], out=grad_x[start:end])
        _accumulate_product(grad_sum[tower], grad[start:end].t(), x[start:end])
    return grad_x


@tower_mm_backward_accumulate.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor, counts: Tensor, grad_sum: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, counts, grad_sum = inputs
    ctx.save_for_backward(x, weight, counts, grad_sum)


def _backward(ctx, grad: Tensor):
    x, weight, counts, grad_sum = ctx.saved_tensors
    if grad_sum is not None:
        return tower_mm_backward_accumulate(grad, x, weight, counts, grad_sum), None, None, None
    grad_x, grad_weight = tower_mm_backward(grad, x, weight, counts)
    return grad_x, grad_weight, None, None


tower_mm.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.mot.tower_mm)
def _tower_mm_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * weight_shape[1] * weight_shape[2]  # every row through one tower's (out, in) matrix


@register_flop_formula([torch.ops.mot.tower_mm_backward, torch.ops.mot.tower_mm_backward_accumulate])
def _tower_mm_backward_flops(grad_shape, x_shape, weight_shape, *args, **kwargs) -> int:
    return 4 * x_shape[0] * weight_shape[1] * weight_shape[2]  # input gradient and weight gradient
