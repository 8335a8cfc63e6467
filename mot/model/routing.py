"""Modality routing: sort the tokens once, then one grouped matmul per projection.

The authors' reference routes with a boolean mask at every projection
(`x[mask_i]`, then a scatter to merge), which costs 2.3x the dense step on an
H100. Here the flattened tokens are sorted by modality once per batch (stable),
the residual stream stays in that order through all layers, and it is un-sorted
only around attention, which is global over the sequence. In sorted order every
modality is one contiguous slice, so each projection is one GEMM per slice
(tower_matmul.py) when the slice sizes are on the host (the trainer counts them
from its CPU batch; a CPU route has them anyway), else a single
`torch._grouped_mm` over the slices (CUDA, bf16) or a split + matmul.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mot.model.tower_matmul import tower_mm

# "auto": one GEMM per tower where the route has host-side counts, else grouped matmul where the kernel supports
# the inputs, else split + matmul. "never": no grouped matmul. "always": grouped wherever torch accepts it (also
# CPU bf16/fp32).
GROUPED_MM = "auto"
# On CUDA, projections of fewer multiply-accumulates (rows x in x out) than this take the grouped matmul even with
# host counts: each per-tower op call costs host time, which a small model cannot hide. The threshold sits
# between the demo_gpu recipe's largest projection and the ~1B recipe's smallest (bench/NOTES.md, "Figures
# moved out of code comments").
PER_TOWER_MIN_MACS = 2 * 10**10


class _Permute(torch.autograd.Function):
    """Row gather whose backward is the inverse gather (no scatter-add, no atomics)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _ExpandTowerRows(torch.autograd.Function):
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
        sums = F.one_hot(tower, width).to(rows.dtype).transpose(0, 1) @ rows
        return sums[: ctx.n_towers].reshape(ctx.n_towers, *grad.shape[1:]), None


@dataclass
class Route:
    """Where each token goes: its tower, and the permutation that groups towers together.

    Rows of a routed tensor are the B*T flattened tokens in sorted order
    (`order[j]` is the natural index of sorted row j). A route with
    `order=None` is the identity: the dense baseline never permutes.
    """

    sorted_modality: torch.Tensor  # (N,) tower index of each sorted row, non-decreasing
    counts: torch.Tensor  # (M,) tokens per tower, on the device
    offsets: torch.Tensor  # (M,) int32 end offset of each tower's slice (grouped_mm's `offs`)
    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    host_counts: torch.Tensor | None = None  # (M,) int64 on the CPU: what the per-tower GEMMs slice by
    _counts_list: list[int] | None = None

    @property
    def n_towers(self) -> int:
        return self.counts.shape[0]

    def counts_list(self) -> list[int]:
        """Slice sizes on the host (reading `counts` is a sync on CUDA where the route has no host counts)."""
        if self._counts_list is None:
            self._counts_list = (self.counts if self.host_counts is None else self.host_counts).tolist()
        return self._counts_list

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """Natural-order rows -> sorted rows."""
        return x if self.order is None else _Permute.apply(x, self.order, self.inverse)

    def unsort(self, x: torch.Tensor) -> torch.Tensor:
        """Sorted rows -> natural-order rows."""
        return x if self.order is None else _Permute.apply(x, self.inverse, self.order)

    def expand(self, weight: torch.Tensor) -> torch.Tensor:
        """(M, ...) per-tower tensor -> (N, ...) one copy per sorted row."""
        return _ExpandTowerRows.apply(weight, self.sorted_modality)


def route_tokens(modality: torch.Tensor, n_towers: int, permute: bool = True,
                 host_counts: Sequence[int] | torch.Tensor | None = None) -> Route:
    """Route a (B, T) or (N,) tensor of tower indices. `permute=False` gives the identity route.

    Every shape here is static (N or M), so torch.compile traces it once for any mix of modalities.
    host_counts: the M tokens per tower, counted by the caller from its host copy of the batch; with them each
    projection can be one cuBLAS GEMM per tower (tower_matmul.py). Reading them from the GPU here would be a
    sync per batch, which stalls a model whose host and GPU work overlap, so without them a CUDA route keeps
    its counts on the device (grouped matmul); a CPU route counts them itself. A tuple of ints passes through
    DDP and FSDP untouched (both move tensor arguments to the GPU; a tensor on the GPU is read back, a sync).
    """
    flat = modality.reshape(-1)
    towers = torch.arange(n_towers, device=flat.device, dtype=flat.dtype)
    if not permute:
        counts = (flat[:, None] == towers).sum(0)
        return Route(flat, counts, counts.cumsum(0).to(torch.int32))
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    sorted_modality = flat.index_select(0, order)
    # End offset of each tower's slice; a tower with no tokens gets an empty slice.
    offsets = torch.searchsorted(sorted_modality, towers, right=True)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    if host_counts is not None:
        host_counts = torch.as_tensor(host_counts, dtype=torch.int64, device="cpu")
        if host_counts.shape != (n_towers,):
            raise ValueError(f"host_counts must hold {n_towers} tower counts, got shape {tuple(host_counts.shape)}")
        if counts.device.type == "cpu" and not torch.equal(host_counts, counts.to(torch.int64)):  # free on the CPU
            raise ValueError(f"host_counts {host_counts.tolist()} do not match the modalities {counts.tolist()}")
    elif counts.device.type == "cpu":
        host_counts = counts.to(torch.int64)
    return Route(sorted_modality, counts, offsets.to(torch.int32), order, inverse, host_counts)


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if GROUPED_MM == "never":
        return False
    dims_ok = x.shape[-1] % 8 == 0 and weight.shape[1] % 8 == 0  # 16-byte aligned bf16 strides
    if GROUPED_MM == "always":
        return dims_ok and x.dtype in (torch.bfloat16, torch.float32) and x.dtype == weight.dtype
    return (
        dims_ok
        and hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
    )


def _per_tower(x: torch.Tensor, weight: torch.Tensor, host_counts: torch.Tensor | None) -> bool:
    """One GEMM per tower: where the counts are on the host, and on CUDA only for GEMMs large enough that the
    per-tower calls' host time hides behind the GPU work (a small model is host-bound; bench/NOTES.md)."""
    if host_counts is None or GROUPED_MM == "always":
        return False
    return not x.is_cuda or x.shape[0] * weight.shape[1] * weight.shape[2] >= PER_TOWER_MIN_MACS


def tower_linear(x: torch.Tensor, weight: torch.Tensor, route: Route, grad_sum: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """y[j] = x[j] @ weight[tower(j)].T for sorted rows x (N, in) and weight (M, out, in).

    grad_sum: an fp32 (M, out, in) tensor the backward adds the weight gradient into, instead of `.grad`
    (tower_matmul.py), where the per-tower GEMMs run; elsewhere the gradient goes to `.grad` as usual."""
    grad_sum = grad_sum if torch.is_grad_enabled() else None
    one_tower = weight.shape[0] == 1
    if one_tower and grad_sum is None:
        return F.linear(x, weight[0])  # the dense model: an ordinary linear layer
    if torch.is_autocast_enabled(x.device.type):
        # The custom and grouped matmuls are not on autocast's lists: cast the way F.linear would be cast.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    # One tower accumulating its gradient: the same op, all rows in one slice.
    host_counts = torch.tensor([x.shape[0]]) if one_tower else route.host_counts
    if _per_tower(x, weight, host_counts):
        return tower_mm(x, weight, host_counts, grad_sum)
    if one_tower:
        return F.linear(x, weight[0])
    if _grouped_mm_supported(x, weight):
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=route.offsets)
    parts = x.split(route.counts_list())
    return torch.cat([F.linear(part, w) for part, w in zip(parts, weight, strict=True)])


class TowerLinear(nn.Module):
    """A bias-free linear layer with one weight per tower (one tower = an ordinary linear layer).

    `grad_sum` (not state; set by mot.train.master_weights when micro-batches are accumulated): an fp32 tensor
    of the weight's shape that the backward adds the weight gradient into, leaving `weight.grad` None.
    """

    def __init__(self, n_towers: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_towers, out_features, in_features))
        self.grad_sum: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        return tower_linear(x, self.weight, route, self.grad_sum)

    def extra_repr(self) -> str:
        m, out_f, in_f = self.weight.shape
        return f"towers={m}, in={in_f}, out={out_f}"


class TowerRMSNorm(nn.Module):
    """RMSNorm over the last dimension with one gain vector per tower.

    Inputs are (N, ..., D) with N sorted rows; statistics are computed in float32 (or float64).
    """

    def __init__(self, n_towers: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_towers, dim))

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        if self.weight.shape[0] == 1:
            return F.rms_norm(x.to(dtype), x.shape[-1:], self.weight[0].to(dtype), self.eps).type_as(x)
        normed = F.rms_norm(x.to(dtype), x.shape[-1:], None, self.eps)
        gain = route.expand(self.weight).to(dtype)
        gain = gain.view(gain.shape[0], *([1] * (x.dim() - 2)), gain.shape[-1])
        return (normed * gain).type_as(x)


class TowerHeadLayerNorm(nn.Module):
    """LayerNorm over the last dimension of (N, H, D) rows with a gain and a bias for every tower and head.

    Chameleon's q/k norm: statistics per head, then the head's own affine (its model-parallel shards each kept
    their own); eps is fixed at 1e-5 as in its code.
    """

    eps = 1e-5

    def __init__(self, n_towers: int, heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_towers, heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_towers, heads, head_dim))

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        normed = F.layer_norm(x.to(dtype), x.shape[-1:], None, None, self.eps)
        if self.weight.shape[0] == 1:
            return (normed * self.weight[0].to(dtype) + self.bias[0].to(dtype)).type_as(x)
        per_row = lambda p: route.expand(p.flatten(1)).view(-1, *p.shape[1:]).to(dtype)
        return (normed * per_row(self.weight) + per_row(self.bias)).type_as(x)
