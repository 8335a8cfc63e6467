"""Per-tower matmul on host-known slice sizes: one ordinary GEMM per tower, written into slices of one output.

Sorted rows make every tower one contiguous slice, so a projection is M plain GEMMs. With the slice sizes on the
host they are cuBLAS calls (on an H100 within 0-4% of one dense GEMM over all rows, where `torch._grouped_mm` is
4-13% slower: bench/tower_gemm.py). The ops are opaque to torch.compile and take the sizes as a CPU tensor, so a
new mix of modalities is neither a new graph nor a host sync inside the compiled blocks.

The ops write into buffers their caller allocates (`mutates_args`) instead of returning new tensors: inductor
treats the output of an opaque op with a CPU tensor among its inputs as possibly misaligned, and compiles the
kernels that read it without vectorised loads (the SwiGLU backward ran ~30% slower on an H100); a buffer
inductor allocates itself is known to be aligned.

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


@torch.library.custom_op("mot::tower_mm_into", mutates_args=("out",))
def tower_mm_into(x: Tensor, weight: Tensor, counts: Tensor, out: Tensor) -> None:
    """out[rows of tower t] = x[rows of tower t] @ weight[t].T for sorted, contiguous rows x (N, in), weight
    (M, out, in) and counts (M,): rows per tower, int64 on the CPU."""
    for tower, start, end in _slices(counts, x.shape[0]):
        torch.mm(x[start:end], weight[tower].t(), out=out[start:end])


def _accumulate_product(total: Tensor, a: Tensor, b: Tensor) -> None:
    """total += a @ b, accumulated in total's dtype."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
    elif total.is_cuda:  # bf16 operands, fp32 output and accumulator: one cuBLAS call, beta = 1
        torch.ops.aten.addmm.dtype_out(total, a, b, total.dtype, out=total)
    else:
        total.addmm_(a.to(total.dtype), b.to(total.dtype))


@torch.library.custom_op("mot::tower_mm_backward_into", mutates_args=("grad_x", "grad_weight"))
def tower_mm_backward_into(grad: Tensor, x: Tensor, weight: Tensor, counts: Tensor, grad_x: Tensor,
                           grad_weight: Tensor, accumulate: bool) -> None:
    """grad_x = the input gradient; grad_weight[t] = (accumulate: +=) the weight gradient of tower t, in
    grad_weight's dtype. Written, a tower without rows gets exactly zero."""
    for tower, start, end in _slices(counts, x.shape[0]):
        torch.mm(grad[start:end], weight[tower], out=grad_x[start:end])
        if accumulate:
            _accumulate_product(grad_weight[tower], grad[start:end].t(), x[start:end])
        else:
            torch.mm(grad[start:end].t(), x[start:end], out=grad_weight[tower])
    if not accumulate:
        for tower, rows in enumerate(counts.tolist()):
            if rows == 0:  # no GEMM wrote this tower's gradient
                grad_weight[tower].zero_()


class _TowerMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, counts: Tensor, grad_sum: Tensor | None) -> Tensor:
        x = x.contiguous()
        out = x.new_empty(x.shape[0], weight.shape[1])
        tower_mm_into(x, weight, counts, out)
        ctx.save_for_backward(x, weight, counts, grad_sum)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, counts, grad_sum = ctx.saved_tensors
        grad, grad_x = grad.contiguous(), torch.empty_like(x)
        if grad_sum is not None:
            tower_mm_backward_into(grad, x, weight, counts, grad_x, grad_sum, True)
            return grad_x, None, None, None
        grad_weight = torch.empty_like(weight)
        tower_mm_backward_into(grad, x, weight, counts, grad_x, grad_weight, False)
        return grad_x, grad_weight, None, None


def tower_mm(x: Tensor, weight: Tensor, counts: Tensor, grad_sum: Tensor | None = None) -> Tensor:
    """y[rows of tower t] = x[rows of tower t] @ weight[t].T for sorted rows x (N, in), weight (M, out, in) and
    counts (M,): rows per tower, int64 on the CPU. grad_sum: where the backward accumulates the weight gradient
    (see the module docstring); the weight then gets no `.grad`."""
    return _TowerMatmul.apply(x, weight, counts, grad_sum)


@register_flop_formula(torch.ops.mot.tower_mm_into)
def _tower_mm_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * weight_shape[1] * weight_shape[2]  # every row through one tower's (out, in) matrix


@register_flop_formula(torch.ops.mot.tower_mm_backward_into)
def _tower_mm_backward_flops(grad_shape, x_shape, weight_shape, *args, **kwargs) -> int:
    return 4 * x_shape[0] * weight_shape[1] * weight_shape[2]  # input gradient and weight gradient
