"""Modality routing: every token through its own tower, with the tokens sorted by modality once per batch.

The authors' reference routes with a boolean mask at every projection (`x[mask_i]`, then a scatter to merge).
Here the flattened tokens are sorted by modality once per batch (stable), the residual stream stays in that
order through all layers, and it is un-sorted only around attention, which is global over the sequence. In
sorted order every tower's tokens are one contiguous slice, so a projection is one matmul per slice and a norm
one gain per row. Which matmul kernel runs a projection is kernels.py's business; the route carries the choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from mot.model.kernels import AUTO, ExpandTowerRows, Kernels, PermuteRows, checked_host_counts, tower_linear


@dataclass
class Route:
    """Where each token goes: its tower, and the permutation that groups towers together. Rows of a routed
    tensor are the B*T flattened tokens in sorted order (`order[j]` is the natural index of sorted row j); with
    `order=None` the route is the identity: the dense baseline never permutes."""

    sorted_modality: torch.Tensor  # (N,) tower index of each sorted row, non-decreasing
    counts: torch.Tensor  # (M,) tokens per tower, on the device
    offsets: torch.Tensor  # (M,) int32 end offset of each tower's slice (grouped_mm's `offs`)
    kernels: Kernels  # which matmul runs the projections (kernels.py)
    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    host_counts: torch.Tensor | None = None  # (M,) int64 on the CPU: what the per-tower GEMMs slice by
    # Every row in this one tower (the host counts say so): the route is the identity and each parameter is
    # its tower's slice, used as an ordinary layer (a decode step: one tower, few rows, host time is the cost).
    tower: int | None = None
    _counts_list: list[int] | None = None

    def counts_list(self) -> list[int]:
        """Slice sizes on the host (reading `counts` is a sync on CUDA where the route has no host counts)."""
        if self._counts_list is None:
            self._counts_list = (self.counts if self.host_counts is None else self.host_counts).tolist()
        return self._counts_list

    def with_kernels(self, kernels: Kernels) -> Route:
        """The same route, its projections run by `kernels`."""
        return replace(self, kernels=kernels)

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """Natural-order rows -> sorted rows."""
        return x if self.order is None else PermuteRows.apply(x, self.order, self.inverse)

    def unsort(self, x: torch.Tensor) -> torch.Tensor:
        """Sorted rows -> natural-order rows."""
        return x if self.order is None else PermuteRows.apply(x, self.inverse, self.order)

    def expand(self, weight: torch.Tensor) -> torch.Tensor:
        """(M, ...) per-tower tensor -> (N, ...) one copy per sorted row."""
        return ExpandTowerRows.apply(weight, self.sorted_modality)

    def one_tower(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The (...) slice of an (M, ...) per-tower tensor that every row uses, or None where rows differ."""
        if weight.shape[0] == 1:
            return weight[0]
        return None if self.tower is None else weight[self.tower]


def route_tokens(modality: torch.Tensor, n_towers: int, permute: bool = True,
                 host_counts: Sequence[int] | torch.Tensor | None = None) -> Route:
    """Route a (B, T) or (N,) tensor of tower indices on the default kernels; `permute=False`: the identity.
    Every shape here is static (N or M), so torch.compile traces it once for any mix of modalities.

    host_counts: the M tokens per tower, counted by the caller on the host, for the per-tower GEMMs
    (kernels.checked_host_counts). A tuple of ints passes through DDP and FSDP untouched (both move tensor
    arguments to the GPU; a tensor on the GPU is read back, a sync). Where they put every row in one tower,
    the route is the identity on that tower (`Route.tower`): a stable sort of one tower is the identity."""
    flat = modality.reshape(-1)
    towers = torch.arange(n_towers, device=flat.device, dtype=flat.dtype)
    one_tower = permute and host_counts is not None and max(int(c) for c in host_counts) == flat.numel() > 0
    if not permute or one_tower:
        counts = (flat[:, None] == towers).sum(0)
        route = Route(flat, counts, counts.cumsum(0).to(torch.int32), AUTO)
        if one_tower:
            route.host_counts = checked_host_counts(host_counts, counts)
            route.tower = int(route.host_counts.argmax())
        return route
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    sorted_modality = flat.index_select(0, order)
    # End offset of each tower's slice; a tower with no tokens gets an empty slice.
    offsets = torch.searchsorted(sorted_modality, towers, right=True)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    return Route(sorted_modality, counts, offsets.to(torch.int32), AUTO, order, inverse,
                 checked_host_counts(host_counts, counts))


class TowerLinear(nn.Module):
    """A bias-free linear layer with one weight per tower (one tower = an ordinary linear layer)."""

    def __init__(self, n_towers: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_towers, out_features, in_features))
        self._gradient_sum: torch.Tensor | None = None  # not state: see accumulate_gradients_into

    def accumulate_gradients_into(self, total: torch.Tensor | None) -> None:
        """From now on the backward adds the weight gradient into `total` (fp32, the weight's shape) and leaves
        `weight.grad` None, where the per-tower GEMMs run (elsewhere it lands in `.grad` as usual); None: back
        to `.grad`. For optimizers that sum micro-batches in fp32 (mot.train.master_weights)."""
        if total is not None and total.shape != self.weight.shape:
            raise ValueError(f"gradient sum of shape {tuple(total.shape)} for a weight of {tuple(self.weight.shape)}")
        self._gradient_sum = total

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        return tower_linear(x, self.weight, route, self._gradient_sum)

    def extra_repr(self) -> str:
        m, out_f, in_f = self.weight.shape
        return f"towers={m}, in={in_f}, out={out_f}"


LOW_PRECISION = (torch.bfloat16, torch.float16)


class TowerRMSNorm(nn.Module):
    """RMSNorm over the last dimension of (N, ..., D) sorted rows with one gain vector per tower; statistics in
    float32 (or float64)."""

    def __init__(self, n_towers: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_towers, dim))

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        gain = route.one_tower(self.weight)
        if gain is not None and x.dtype == gain.dtype in LOW_PRECISION and not torch.is_grad_enabled():
            # Decoding, evaluation: rms_norm's own kernels take bf16 and compute the statistics in float32
            # (one fused kernel on CUDA for four launches); training keeps the graph inductor compiles.
            return F.rms_norm(x, x.shape[-1:], gain, self.eps)
        dtype = torch.promote_types(x.dtype, torch.float32)
        if gain is not None:
            return F.rms_norm(x.to(dtype), x.shape[-1:], gain.to(dtype), self.eps).type_as(x)
        normed = F.rms_norm(x.to(dtype), x.shape[-1:], None, self.eps)
        gain = route.expand(self.weight).to(dtype)
        gain = gain.view(gain.shape[0], *([1] * (x.dim() - 2)), gain.shape[-1])
        return (normed * gain).type_as(x)


class TowerHeadLayerNorm(nn.Module):
    """LayerNorm over the last dimension of (N, H, D) rows with a gain and a bias for every tower and head:
    Chameleon's q/k norm (statistics per head, then the head's own affine, as its model-parallel shards each
    kept their own; eps fixed at 1e-5 as in its code)."""

    eps = 1e-5

    def __init__(self, n_towers: int, heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_towers, heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_towers, heads, head_dim))

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        normed = F.layer_norm(x.to(dtype), x.shape[-1:], None, None, self.eps)
        gain, bias = route.one_tower(self.weight), route.one_tower(self.bias)
        if gain is not None:
            return (normed * gain.to(dtype) + bias.to(dtype)).type_as(x)
        per_row = lambda p: route.expand(p.flatten(1)).view(-1, *p.shape[1:]).to(dtype)
        return (normed * per_row(self.weight) + per_row(self.bias)).type_as(x)
