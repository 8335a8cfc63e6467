"""Parameters and FLOPs per token, MoT against the dense baseline, from the config alone.

One source of truth for sizes: the trainer's MFU, `mot flops` and `mot compare`
all read these functions, and a test checks them against
`torch.utils.flop_counter.FlopCounterMode` on a real forward+backward.

Conventions (the ones torchtitan and the PaLM appendix use):
- FLOPs count multiply-adds as 2 and only matrix products: projections, the
  output head over the unified vocabulary, and attention's QK^T and AV.
  Norms, activations, rotary embeddings, the loss and routing's permutations
  are not counted (each is O(D) per token against O(D^2)).
- Backward costs twice the forward, so forward+backward = 3x forward.
- Attention: `causal` counts the average causal context (T+1)/2 per token,
  the work a causal kernel must do; `full` counts the whole T x T square, what
  FlopCounterMode reports for an SDPA call.
- A MoT token goes through exactly one tower, so MoT and dense of the same
  width do the same FLOPs per token; MoT holds more parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from mot.config import ModelConfig
from mot.vocab import UnifiedVocab

AttentionCount = Literal["causal", "full"]


@dataclass(frozen=True)
class SizeReport:
    total_params: int
    embedding_params: int  # input embedding + output head (once when tied)
    tower_params: int  # parameters of ONE tower stack (attn + ffn + norms of every layer; the first modality's)
    active_params: dict[str, int]  # per modality: parameters a token of it touches (embedding included)
    active_params_mixed: float  # weighted by the modalities' token fractions
    flops_forward: dict[str, float]  # per token, per modality
    flops_forward_backward: dict[str, float]
    flops_forward_backward_mixed: float
    attention_flops_forward: float  # per token, included in flops_forward
    seq_len: int


def dense_baseline(cfg: ModelConfig) -> ModelConfig:
    """The same model with nothing untied."""
    return dataclasses.replace(cfg, untie=[])


def _layer_params(cfg: ModelConfig, modality: int = 0) -> dict[str, int]:
    """Parameters of one copy of each component in one layer (of `modality`'s tower: Pattention towers may
    hold different token counts)."""
    qk_norm = 2 * cfg.head_dim if cfg.qk_norm else 0
    norm = 2 * cfg.dim + qk_norm  # attention and FFN norms (+ per-head q/k norm gains)
    if cfg.projection == "pattention":
        # n tokens of a Pattention in -> out hold n * (in + out) parameters; a token multiplies with all of them
        # once (x K^T, then Theta V), so FLOPs stay 2 x parameters. The modified softmax is O(n), not counted.
        # A shared (tied) projection is the first modality's, as in the model.
        attn = cfg.param_tokens_of("attn", modality if cfg.towers("attn") > 1 else 0)
        ffn = cfg.param_tokens_of("ffn", modality if cfg.towers("ffn") > 1 else 0)
        return {"attn": attn * (cfg.dim + 3 * cfg.dim) + attn * 2 * cfg.dim, "ffn": ffn * 2 * cfg.dim, "norm": norm}
    return {
        "attn": 4 * cfg.dim * cfg.dim,  # fused QKV + output projection
        "ffn": 3 * cfg.dim * cfg.ffn_hidden,  # SwiGLU w1, w3, w2
        "norm": norm,
    }


def _tower_stack(cfg: ModelConfig, modality: int) -> int:
    """Parameters of the tower stack a token of `modality` runs through: every layer and the final norm."""
    return cfg.n_layers * sum(_layer_params(cfg, modality).values()) + cfg.dim


def _mixture(cfg: ModelConfig) -> dict[str, float]:
    """Token share of each modality; uniform when the recipe gives none."""
    fractions = {m.name: m.token_fraction for m in cfg.modalities}
    total = sum(fractions.values())
    if total <= 0:
        return {name: 1.0 / len(fractions) for name in fractions}
    return {name: f / total for name, f in fractions.items()}


def param_counts(cfg: ModelConfig) -> tuple[int, int, int]:
    """(total, embedding + head, one tower stack: the first modality's)."""
    vocab = UnifiedVocab(cfg).size
    embedding = vocab * cfg.dim * (1 if cfg.tie_embeddings else 2)
    layers = [_layer_params(cfg, m) for m in range(cfg.n_modalities)]
    total = embedding + cfg.towers("norm") * cfg.dim  # final norm(s)
    total += cfg.n_layers * sum(layers[m][part] for part in layers[0] for m in range(cfg.towers(part)))
    return total, embedding, _tower_stack(cfg, 0)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, attention: AttentionCount) -> float:
    """Forward FLOPs of QK^T and AV for one token, all layers."""
    context = (seq_len + 1) / 2 if attention == "causal" else seq_len
    return cfg.n_layers * 2 * 2 * cfg.dim * context


def size_report(cfg: ModelConfig, seq_len: int, attention: AttentionCount = "causal") -> SizeReport:
    total, embedding, one_tower = param_counts(cfg)
    vocab = UnifiedVocab(cfg).size
    attn = attention_flops_per_token(cfg, seq_len, attention)
    names = [m.name for m in cfg.modalities]
    active, forward = {}, {}
    for m, name in enumerate(names):
        layer = _layer_params(cfg, m)
        # Matrix parameters one token multiplies with: its tower's projections and the shared head.
        matmul_params = cfg.n_layers * (layer["attn"] + layer["ffn"]) + vocab * cfg.dim
        forward[name] = 2 * matmul_params + attn
        active[name] = embedding + _tower_stack(cfg, m)
    mix = _mixture(cfg)
    return SizeReport(
        total_params=total,
        embedding_params=embedding,
        tower_params=one_tower,
        active_params=active,
        active_params_mixed=sum(mix[n] * active[n] for n in names),
        flops_forward=forward,
        flops_forward_backward={n: 3 * forward[n] for n in names},
        flops_forward_backward_mixed=sum(mix[n] * 3 * forward[n] for n in names),
        attention_flops_forward=attn,
        seq_len=seq_len,
    )


# ---------------------------------------------------------------- measured


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2D x 3D (forward, grad of input): each row meets one group's matrix. 2D x 2D (grad of weight)
    and 3D x 3D: every output element is a dot product over the contraction dimension."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # (K, N) x (N, O): sum over groups of N
    return 2 * a_shape[0] * a_shape[-2] * a_shape[-1] * b_shape[-1]


def flop_counter() -> torch.utils.flop_counter.FlopCounterMode:
    """FlopCounterMode that also counts torch._grouped_mm (not in torch's own table)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._grouped_mm: _grouped_mm_flops}
    return FlopCounterMode(display=False, custom_mapping=mapping)
