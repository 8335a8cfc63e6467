"""The slow oracle: mask routing as the authors' reference does it, written from scratch.

Computes the same function as `MoTTransformer` from the same parameters, but in
natural token order with a boolean mask per modality at every projection and
norm (`x[mask_i]`, then a merge), the way facebookresearch/Mixture-of-Transformers
routes. Tests compare the sorted/grouped routing against it (`fast=False`:
rotary embeddings in complex form and attention by an explicit float64 softmax,
sharing no code with the model); bench/routing.py times it as the naive
baseline (`fast=True`: the model's rotary and SDPA, so only routing differs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mot.model.pattention import TowerPattention
from mot.model.rope import apply_rotary
from mot.model.transformer import MoTTransformer


def _tower(weight: torch.Tensor, i: int) -> torch.Tensor:
    return weight[i] if weight.shape[0] > 1 else weight[0]


def _per_modality(x: torch.Tensor, masks: list[torch.Tensor], fn, out_dim: int) -> torch.Tensor:
    """Apply fn(rows, i) to each modality's rows of x (N, ...) and merge into one tensor."""
    out = x.new_zeros(x.shape[0], *x.shape[1:-1], out_dim)
    for i, mask in enumerate(masks):
        out[mask] = fn(x[mask], i)
    return out


def _linear(x, weight, masks):
    return _per_modality(x, masks, lambda rows, i: rows @ _tower(weight, i).T, weight.shape[1])


def _pattention(x, module, masks, cfg, component):
    """TokenFormer's Pattention per modality, written out: GeLU(S tau / ||S||_2) V with S = x K^T."""

    def attend(rows, i):
        t = i if module.keys.shape[0] > 1 else 0
        n = module.n_tokens[t]
        scores = rows.double() @ module.keys[t, :n].double().T
        scaled = scores * math.sqrt(cfg.tau_tokens_of(component, t)) / scores.pow(2).sum(-1, keepdim=True).sqrt()
        theta = 0.5 * scaled * (1 + torch.erf(scaled / math.sqrt(2)))
        return (theta @ module.values[t, :n].double()).to(rows.dtype)

    return _per_modality(x, masks, attend, module.values.shape[-1])


def _project(module, x, masks, cfg, component):
    if isinstance(module, TowerPattention):
        return _pattention(x, module, masks, cfg, component)
    return _linear(x, module.weight, masks)


def _rms_norm(x, weight, eps, masks):
    def norm(rows, i):
        wide = rows.to(torch.promote_types(rows.dtype, torch.float32))
        scale = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
        return (wide * scale * _tower(weight, i).to(wide.dtype)).to(rows.dtype)

    return _per_modality(x, masks, norm, weight.shape[-1])


def _head_layer_norm(x, module, masks):
    """(N, H, D) rows: LayerNorm statistics per head, then the tower's per-head gain and bias."""

    def norm(rows, i):
        wide = rows.to(torch.promote_types(rows.dtype, torch.float32))
        centred = wide - wide.mean(-1, keepdim=True)
        scaled = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + module.eps)
        return (scaled * _tower(module.weight, i) + _tower(module.bias, i)).to(rows.dtype)

    return _per_modality(x, masks, norm, x.shape[-1])


def _rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """(B, T, H, D), dims i and i + D/2 form one complex pair rotated by position * theta^(-2i/D)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2 / x.shape[-1])
    angle = positions.to(torch.float64)[..., None] * freqs  # (B, T, D/2)
    rot = torch.polar(torch.ones_like(angle), angle)[:, :, None, :]
    pairs = torch.complex(x[..., :half].double(), x[..., half:].double()) * rot
    return torch.cat([pairs.real, pairs.imag], dim=-1).to(x.dtype)


def _attention(q, k, v, fast: bool) -> torch.Tensor:
    """(B, H, T, D) causal attention; keys and values of fewer heads are shared by groups of query heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if fast:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    seq = q.shape[-2]
    scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return (scores.softmax(-1) @ v.double()).to(q.dtype)


def _attention_sublayer(attn, h, masks, cfg, batch, seq_len, positions, fast, rope):
    n_rows, head_dim = h.shape[0], cfg.head_dim
    q, k, v = _project(attn.qkv, h, masks, cfg, "attn").split([cfg.dim, cfg.kv_dim, cfg.kv_dim], dim=-1)
    q, k, v = (t.reshape(n_rows, -1, head_dim) for t in (q, k, v))
    if attn.q_norm is not None and cfg.qk_norm_type == "layernorm_per_head":
        q, k = _head_layer_norm(q, attn.q_norm, masks), _head_layer_norm(k, attn.k_norm, masks)
    elif attn.q_norm is not None:
        q = _rms_norm(q, attn.q_norm.weight, cfg.norm_eps, masks)
        k = _rms_norm(k, attn.k_norm.weight, cfg.norm_eps, masks)
    q, k, v = (t.reshape(batch, seq_len, -1, head_dim) for t in (q, k, v))
    if fast:
        cos, sin = rope(seq_len, None)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    else:
        q, k = _rotary(q, positions, cfg.rope_theta), _rotary(k, positions, cfg.rope_theta)
    out = _attention(*(t.transpose(1, 2) for t in (q, k, v)), fast=fast)
    return _project(attn.out, out.transpose(1, 2).reshape(n_rows, cfg.dim), masks, cfg, "attn")


def _ffn_sublayer(ffn, h, masks, cfg):
    if cfg.projection == "pattention":
        return _pattention(h, ffn.proj, masks, cfg, "ffn")
    gate, up = _linear(h, ffn.w13.weight, masks).chunk(2, dim=-1)
    return _linear(F.silu(gate) * up, ffn.w2.weight, masks)


def mask_routed_blocks(
    model: MoTTransformer,
    x: torch.Tensor,
    modality: torch.Tensor,
    fast: bool = False,
) -> torch.Tensor:
    """Run the blocks and the final norm on embedded rows x (B, T, D), natural order, mask routing."""
    cfg = model.cfg
    batch, seq_len, _ = x.shape
    flat = modality.reshape(-1)
    masks = [flat == i for i in range(cfg.n_modalities)]
    positions = torch.arange(seq_len, device=x.device).expand(batch, seq_len)
    x = x.reshape(batch * seq_len, cfg.dim)
    rope = model.rope

    for block in model.blocks:
        attn_norm = lambda h, w=block.attn_norm.weight: _rms_norm(h, w, cfg.norm_eps, masks)
        ffn_norm = lambda h, w=block.ffn_norm.weight: _rms_norm(h, w, cfg.norm_eps, masks)
        attention = lambda h, a=block.attn: _attention_sublayer(a, h, masks, cfg, batch, seq_len, positions, fast, rope)
        ffn = lambda h, f=block.ffn: _ffn_sublayer(f, h, masks, cfg)
        if cfg.norm_placement == "pre":
            x = x + attention(attn_norm(x))
            x = x + ffn(ffn_norm(x))
        else:
            x = x + attn_norm(attention(x))
            x = x + ffn_norm(ffn(x))

    x = _rms_norm(x, model.final_norm.weight, cfg.norm_eps, masks)
    return x.reshape(batch, seq_len, cfg.dim)


def mask_routed_forward(
    model: MoTTransformer,
    tokens: torch.Tensor,
    modality: torch.Tensor | None = None,
    fast: bool = False,
) -> torch.Tensor:
    """Logits (B, T, V) of `model` computed with boolean-mask routing."""
    if modality is None:
        modality = model.vocab.modality_of(tokens)
    hidden = mask_routed_blocks(model, model.embed(tokens), modality, fast)
    return hidden @ model.head.weight.T
