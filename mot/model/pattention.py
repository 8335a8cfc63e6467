"""Token-parameter attention (Pattention, TokenFormer: Wang et al., arXiv 2410.23168), one per tower.

A projection in -> out becomes attention from the input rows (queries) to n learnable parameter tokens,
keys K (n, in) and values V (n, out):

    Pattention(X) = Theta(X K^T) V,    Theta(S)_ij = GeLU(S_ij * tau / ||S_i,:||_2),    tau = sqrt(n)

Theta is the paper's modified softmax (eq. 5) and the "l2_norm_gelu" branch of `Pattention.nonlinear_norm_func`
in github.com/Haiyang-W/TokenFormer (megatron/model/tokenformer.py), which every released config selects:
no 1/sqrt(d) scale on the scores, the row's L2 norm clamped away from zero, exact (erf) GeLU.

Growth appends tokens. A token whose key is zero scores 0, adds nothing to ||S_i||, and GeLU(0) = 0: whatever
its value, the output is unchanged, as long as tau stays what it was (TokenFormer recomputes sqrt(n) and so
shifts the function slightly; we keep the pre-growth n in `model.param_tokens_tau`). The value of a new token
must not be zero as well: with both zero no gradient ever reaches it (d/dK is proportional to V), so
`mot grow` gives new tokens zero keys and freshly initialised values.

Towers may hold different token counts (`model.param_tokens_per_modality`): keys and values are stored padded
to the largest count with zero rows, which by the argument above change nothing and receive zero gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mot.config import ModelConfig
from mot.model.kernels import cast_for_autocast, tower_linear
from mot.model.routing import Route, TowerLinear

NORM_EPS = 1e-8  # TokenFormer clamps the row norm the same way: an all-zero score row maps to zeros


def modified_softmax(scores: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Theta(S) = GeLU(S * tau / ||S||_2) over the last dimension, computed in float32 (or float64)."""
    wide = scores.to(torch.promote_types(scores.dtype, torch.float32))
    norm = torch.linalg.vector_norm(wide, dim=-1, keepdim=True).clamp_min(NORM_EPS)
    tau = tau.to(wide.dtype) if isinstance(tau, torch.Tensor) else tau
    return F.gelu(wide * tau / norm).to(scores.dtype)


def pattention(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tau: float) -> torch.Tensor:
    """One tower: x (N, in), keys (n, in), values (n, out) -> (N, out)."""
    return F.linear(modified_softmax(F.linear(x, keys), tau), values.T)


class TowerPattention(nn.Module):
    """Pattention with one set of parameter tokens per tower; takes `(x, route)` like TowerLinear.

    keys (towers, n_max, in) and values (towers, n_max, out); tower t uses its first n_tokens[t] rows.
    """

    def __init__(self, n_towers: int, in_features: int, out_features: int, n_tokens: list[int],
                 tau_tokens: list[int]):
        super().__init__()
        if len(n_tokens) != n_towers or len(tau_tokens) != n_towers:
            raise ValueError(f"need one token count per tower ({n_towers}), got {n_tokens} and {tau_tokens}")
        self.n_tokens = list(n_tokens)
        width = max(n_tokens)
        self.keys = nn.Parameter(torch.zeros(n_towers, width, in_features))
        self.values = nn.Parameter(torch.zeros(n_towers, width, out_features))
        self.taus = [math.sqrt(n) for n in tau_tokens]
        # Per-row tau for the grouped path; derived from the config, so not part of the checkpoint.
        self.register_buffer("tau", torch.tensor(self.taus, dtype=torch.float64), persistent=False)

    @property
    def uniform(self) -> bool:
        return len(set(self.n_tokens)) == 1

    @torch.no_grad()
    def reset_parameters(self, key_std: float, value_std: float) -> None:
        nn.init.normal_(self.keys, std=key_std)
        nn.init.normal_(self.values, std=value_std)
        self.zero_padding_()

    @torch.no_grad()
    def zero_padding_(self) -> None:
        for t, n in enumerate(self.n_tokens):
            self.keys[t, n:] = 0
            self.values[t, n:] = 0

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        if self.keys.shape[0] == 1 or route.tower is not None:  # every row in one tower
            t = 0 if self.keys.shape[0] == 1 else route.tower
            n = self.n_tokens[t]
            x, keys, values = cast_for_autocast(x, self.keys[t, :n], self.values[t, :n])
            return pattention(x, keys, values, self.taus[t])
        if self.uniform or route.kernels.grouped(x, self.keys):
            # Two tower matmuls over the padded tokens (exact: padding rows are zero), on the route's kernels;
            # the modified softmax runs row-wise between them.
            scores = tower_linear(x, self.keys, route)
            weights = modified_softmax(scores, route.expand(self.tau)[:, None])
            return tower_linear(weights, self.values.transpose(-2, -1), route)
        x, keys, values = cast_for_autocast(x, self.keys, self.values)
        parts = x.split(route.counts_list())
        return torch.cat([pattention(part, keys[t, :n], values[t, :n], tau)
                          for t, (part, n, tau) in enumerate(zip(parts, self.n_tokens, self.taus, strict=True))])

    def extra_repr(self) -> str:
        m, _, in_f = self.keys.shape
        return f"towers={m}, in={in_f}, out={self.values.shape[-1]}, tokens={self.n_tokens}"


def tower_projection(cfg: ModelConfig, component: str, in_features: int, out_features: int
                     ) -> TowerLinear | TowerPattention:
    """The projection of `component` ("attn" or "ffn") that the recipe asks for (`model.projection`)."""
    towers = cfg.towers(component)
    if cfg.projection == "linear":
        return TowerLinear(towers, in_features, out_features)
    tokens = [cfg.param_tokens_of(component, m) for m in range(towers)]
    taus = [cfg.tau_tokens_of(component, m) for m in range(towers)]
    return TowerPattention(towers, in_features, out_features, tokens, taus)
