"""The MoT block: global attention and a SwiGLU FFN, each parameter once per tower.

Reads like a plain pre-norm transformer block; the only addition is the `route`
that every projection and norm takes (see routing.py). Activations are (N, D)
rows in the route's sorted order; attention alone runs in natural (B, T) order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mot.config import ModelConfig
from mot.model.masks import BlockMask, flex
from mot.model.pattention import tower_projection
from mot.model.rope import apply_rotary, apply_rotary_together
from mot.model.routing import Route, TowerHeadLayerNorm, TowerLinear, TowerRMSNorm


@dataclass
class AttentionInputs:
    """What attention needs besides the rows: the sequence shape, rotary tables and the mask."""

    batch: int
    seq_len: int
    cos: torch.Tensor
    sin: torch.Tensor
    # boolean (B, 1, T, T), True = may attend; or a FlexAttention BlockMask (CUDA); None = causal
    mask: torch.Tensor | BlockMask | None = None
    # Incremental decoding: stores this layer's new keys/values, returns the cached ones to attend over
    # (then `mask` is (B, 1, T, S) over those S slots). None = attention over the T rows alone (training).
    cache: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


def qk_norms(cfg: ModelConfig) -> tuple[nn.Module, nn.Module] | tuple[None, None]:
    """The query and key norms: norms, so untied with "norm", like the reference's per-modality q/k norms."""
    if not cfg.qk_norm:
        return None, None
    towers = cfg.towers("norm")
    if cfg.qk_norm_type == "layernorm_per_head":
        return (TowerHeadLayerNorm(towers, cfg.n_heads, cfg.head_dim),
                TowerHeadLayerNorm(towers, cfg.kv_heads, cfg.head_dim))
    return TowerRMSNorm(towers, cfg.head_dim, cfg.norm_eps), TowerRMSNorm(towers, cfg.head_dim, cfg.norm_eps)


class Attention(nn.Module):
    """Queries, keys and values from one fused projection; n_kv_heads < n_heads is grouped-query attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads = cfg.n_heads, cfg.kv_heads
        self.split = (cfg.dim, cfg.kv_dim, cfg.kv_dim)
        self.qkv = tower_projection(cfg, "attn", cfg.dim, sum(self.split))
        self.out = tower_projection(cfg, "attn", cfg.dim, cfg.dim)
        self.q_norm, self.k_norm = qk_norms(cfg)

    def forward(self, x: torch.Tensor, route: Route, inputs: AttentionInputs) -> torch.Tensor:
        # Reshapes by hand rather than einops: a decoding step runs this per layer and token, where the host time
        # of each call counts.
        q, k, v = self.qkv(x, route).split(self.split, dim=-1)
        q = q.unflatten(-1, (self.n_heads, -1))  # (N, H, D)
        k, v = (t.unflatten(-1, (self.kv_heads, -1)) for t in (k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q, route), self.k_norm(k, route)
        # Global attention over the whole sequence: back to natural order for this part only.
        seq = lambda t: route.unsort(t).unflatten(0, (inputs.batch, -1))  # (B, T, H, D)
        q, k, v = seq(q), seq(k), seq(v)
        if torch.is_grad_enabled():  # training: the graph inductor compiles stays as measured
            q, k = apply_rotary(q, inputs.cos, inputs.sin), apply_rotary(k, inputs.cos, inputs.sin)
        else:  # decoding, evaluation: the same values in half the launches
            q, k = apply_rotary_together(q, k, inputs.cos, inputs.sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if inputs.cache is not None:
            k, v = (t.to(q.dtype) for t in inputs.cache(k, v))
        gqa = self.kv_heads != self.n_heads
        if inputs.mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif isinstance(inputs.mask, BlockMask):  # packed documents on CUDA: masked tiles are skipped
            out = flex(q, k, v, inputs.mask, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask, enable_gqa=gqa)
        out = route.sort(out.transpose(1, 2).flatten(2).flatten(0, 1))  # (B, H, T, D) -> (B*T, H*D)
        return self.out(out, route)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(x w1) * x w3), with w1 and w3 fused into one projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        towers = cfg.towers("ffn")
        self.w13 = TowerLinear(towers, cfg.dim, 2 * cfg.ffn_hidden)
        self.w2 = TowerLinear(towers, cfg.ffn_hidden, cfg.dim)

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        gate, up = self.w13(x, route).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up, route)


class PattentionFeedForward(nn.Module):
    """TokenFormer's FFN: one Pattention dim -> dim. Its keys and values play the two weight matrices of an MLP
    with one hidden unit per parameter token and the modified softmax as the activation, so SwiGLU's gate has
    no counterpart; Pattention inside SwiGLU would stack two nonlinearities per layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = tower_projection(cfg, "ffn", cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        return self.proj(x, route)


class MoTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        towers = cfg.towers("norm")
        self.attn_norm = TowerRMSNorm(towers, cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = TowerRMSNorm(towers, cfg.dim, cfg.norm_eps)
        self.ffn = PattentionFeedForward(cfg) if cfg.projection == "pattention" else FeedForward(cfg)
        self.pre_norm = cfg.norm_placement == "pre"

    def forward(self, x: torch.Tensor, route: Route, inputs: AttentionInputs) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x, route), route, inputs)
            return x + self.ffn(self.ffn_norm(x, route), route)
        # Chameleon: each sub-layer's output is normalised inside the residual branch.
        x = x + self.attn_norm(self.attn(x, route, inputs), route)
        return x + self.ffn_norm(self.ffn(x, route), route)
