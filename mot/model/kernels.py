"""How the routed model runs fast: the matmul kernel of each tower projection, and the routing's own backwards.

routing.py says what a projection computes: every sorted row times its own tower's weight, each tower one
contiguous slice of the rows. Three kernels compute that, and `Kernels` picks one per projection:

- per tower (tower_matmul.py): one GEMM per slice (cuBLAS on CUDA). It needs the slice sizes on the host:
  the trainer counts them from its CPU batch (`host_counts`), a CPU route counts them itself, and reading them
  from a GPU route would be a sync. Every call costs host time, which a small model cannot hide.
- grouped: one `torch._grouped_mm` over the slices, whose ends stay on the device (`Route.offsets`): no sync,
  and static shapes under torch.compile. CUDA bf16 from Hopper on; anywhere torch accepts it when forced.
- split: `x.split(sizes)` and one `F.linear` per tower, the fallback; it reads the sizes on the host.

The choice comes from the recipe (`model.kernels`, which `MoTTransformer` turns into its `kernels`) or is passed
explicitly (`Route.with_kernels`); the route carries it to every projection. Every choice computes the same
function: only speed differs.

Also here, as the kernels need them: the check of the caller's host counts, the autocast casting of the
matmuls autocast does not know, and the backward passes of routing's row permutation and per-tower expansion,
written to avoid scatter-adds on the GPU.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from mot.config import KernelChoice
from mot.model.tower_matmul import tower_mm

MATMUL_CHOICES: tuple[str, ...] = typing.get_args(KernelChoice)


@dataclass(frozen=True)
class Kernels:
    """Which kernel runs each tower projection (the module docstring describes the three). matmul:

    - "auto": per tower where the route has host counts (on CUDA only from `per_tower_min_macs` up), else
      grouped where the kernel takes the inputs (CUDA, bf16, Hopper or later), else split;
    - "per_tower": per tower wherever the route has host counts, else as "auto";
    - "grouped": grouped wherever torch accepts the inputs (the CPU too, bf16 or fp32), else split;
    - "split": split + matmul everywhere.
    """

    matmul: KernelChoice = "auto"
    # On CUDA, "auto" sends projections of fewer multiply-accumulates (rows x in x out) than this to the grouped
    # kernel even with host counts: the per-tower calls' host time would not hide behind the GPU work. The
    # threshold sits between the demo_gpu recipe's largest projection and the ~1B recipe's smallest
    # (bench/NOTES.md, "Figures moved out of code comments").
    per_tower_min_macs: int = 2 * 10**10

    def __post_init__(self) -> None:
        if self.matmul not in MATMUL_CHOICES:
            raise ValueError(f"Kernels.matmul must be one of {list(MATMUL_CHOICES)}, got {self.matmul!r}")

    def grouped(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether `torch._grouped_mm` runs rows x (N, in) through per-tower weights (M, out, in)."""
        if self.matmul == "split":
            return False
        dims_ok = x.shape[-1] % 8 == 0 and weight.shape[1] % 8 == 0  # 16-byte aligned bf16 strides
        if self.matmul == "grouped":
            return dims_ok and x.dtype in (torch.bfloat16, torch.float32) and x.dtype == weight.dtype
        return (
            dims_ok
            and hasattr(torch, "_grouped_mm")
            and x.is_cuda
            and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
        )

    def per_tower(self, x: torch.Tensor, weight: torch.Tensor, host_counts: torch.Tensor | None) -> bool:
        """Whether one GEMM per tower runs the projection (needs the slice sizes on the host)."""
        if host_counts is None or self.matmul in ("grouped", "split"):
            return False
        if self.matmul == "per_tower" or not x.is_cuda:
            return True
        return x.shape[0] * weight.shape[1] * weight.shape[2] >= self.per_tower_min_macs


AUTO = Kernels()


class TowerSlices(Protocol):
    """What the kernels read of a route (mot.model.routing.Route)."""

    kernels: Kernels
    offsets: torch.Tensor  # (M,) int32 end of each tower's slice
    host_counts: torch.Tensor | None  # (M,) int64 on the CPU
    tower: int | None  # every row in this tower

    def counts_list(self) -> list[int]: ...


def cast_for_autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in autocast's dtype where autocast is on: the per-tower and grouped matmuls are not on its
    lists, so they are cast the way F.linear would be."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def tower_linear(x: torch.Tensor, weight: torch.Tensor, route: TowerSlices, grad_sum: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """y[j] = x[j] @ weight[tower(j)].T for sorted rows x (N, in) and weight (M, out, in), on the route's kernels.

    grad_sum: an fp32 (M, out, in) tensor the backward adds the weight gradient into, instead of `.grad`
    (tower_matmul.py), where the per-tower GEMMs run; elsewhere the gradient goes to `.grad` as usual."""
    grad_sum = grad_sum if torch.is_grad_enabled() else None
    one_tower = weight.shape[0] == 1
    if grad_sum is None and (one_tower or route.tower is not None):
        # the dense model, or every row in one tower: an ordinary linear layer
        return F.linear(x, weight[0 if one_tower else route.tower])
    x, weight = cast_for_autocast(x, weight)
    # One tower accumulating its gradient: the same op, all rows in one slice.
    host_counts = torch.tensor([x.shape[0]]) if one_tower else route.host_counts
    if route.kernels.per_tower(x, weight, host_counts):
        return tower_mm(x, weight, host_counts, grad_sum)
    if one_tower:
        return F.linear(x, weight[0])
    if route.kernels.grouped(x, weight):
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=route.offsets)
    parts = x.split(route.counts_list())
    return torch.cat([F.linear(part, w) for part, w in zip(parts, weight, strict=True)])


def checked_host_counts(host_counts: Sequence[int] | torch.Tensor | None, counts: torch.Tensor
                        ) -> torch.Tensor | None:
    """The per-tower kernel's slice sizes: the caller's host counts, checked against the route's `counts` where
    that is free (on the CPU), or the CPU route's own; None for a GPU route without them (reading its counts
    would be a sync per batch, which stalls a model whose host and GPU work overlap)."""
    if host_counts is None:
        return counts.to(torch.int64) if counts.device.type == "cpu" else None
    host_counts = torch.as_tensor(host_counts, dtype=torch.int64, device="cpu")
    if host_counts.shape != counts.shape:
        raise ValueError(f"host_counts must hold {counts.shape[0]} tower counts, got shape {tuple(host_counts.shape)}")
    if counts.device.type == "cpu" and not torch.equal(host_counts, counts.to(torch.int64)):
        raise ValueError(f"host_counts {host_counts.tolist()} do not match the modalities {counts.tolist()}")
    return host_counts


class PermuteRows(torch.autograd.Function):
    """Row gather whose backward is the inverse gather (no scatter-add, no atomics)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class ExpandTowerRows(torch.autograd.Function):
    """weight[tower_of_row]: per-row copies of a per-tower vector.

    The default backward of an index is an index_add with N rows landing on a
    handful of tower rows (atomic contention on the GPU); one one-hot matmul
    sums them instead (bench/NOTES.md, "Figures moved out of code comments").
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, tower: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(tower)
        ctx.n_towers = weight.shape[0]
        return weight.index_select(0, tower)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (tower,) = ctx.saved_tensors
        rows = grad.reshape(grad.shape[0], -1)
        # One-hot columns padded to a multiple of 8: with 3 towers the GEMM's operands are misaligned and cuBLAS
        # falls back to an old unaligned kernel (its cost: bench/NOTES.md).
        width = -(-ctx.n_towers // 8) * 8
        # A comparison rather than F.one_hot, whose range check reads the GPU (a sync; train.cuda_graph's capture)
        one_hot = tower[None, :] == torch.arange(width, device=tower.device, dtype=tower.dtype)[:, None]
        sums = one_hot.to(rows.dtype) @ rows
        return sums[: ctx.n_towers].reshape(ctx.n_towers, *grad.shape[1:]), None
