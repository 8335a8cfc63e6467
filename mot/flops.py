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
  the work a causal kernel must do over a whole row; `full` counts the whole
  T x T square, what FlopCounterMode reports for an SDPA call. Training batches
  are packed documents under a document mask: the trainer counts their
  attention exactly, from each batch's documents (`attention_pairs`), for its
  FLOPs and MFU; the full-row causal figure stands beside it, labelled so.
- A MoT token goes through exactly one tower, so MoT and dense of the same
  width do the same FLOPs per token; MoT holds more parameters.
- Diffusion modalities (Transfusion setting): a latent token also runs its
  modality's latent projections (mot.model.latent_io: input Linear, timestep
  MLP, output Linear), and the shared head still runs over it (the model
  computes logits at every position). The dense baseline keeps them. In
  training, the input Linear and the timestep MLP's first Linear read inputs
  that need no gradient (noised latents, sinusoidal features): their backward
  is the weight gradient alone, 1x their forward instead of 2x. With `causal`
  counting, a latent token also sees the later tokens of its own bidirectional
  span: (n - 1) / 2 more keys on average for a span of n.
- Sampling (`diffusion_image_sampling_flops`, `ar_image_sampling_flops`)
  counts the exact keys each query attends to over a KV cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from mot.config import ModelConfig
from mot.vocab import UnifiedVocab

AttentionCount = Literal["causal", "full"]

# mot.model.latent_io.TimestepEmbedding's sinusoidal features (its `frequencies` default); a test checks the
# parameter count against the model.
TIMESTEP_FREQUENCIES = 256


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
    attention_flops_forward: float  # per token, included in flops_forward (an AR token's; see the module doc)
    seq_len: int
    latent_params: int = 0  # latent projections of every diffusion modality, included in total_params


def dense_baseline(cfg: ModelConfig) -> ModelConfig:
    """The same model with nothing untied."""
    return dataclasses.replace(cfg, untie=[])


def _layer_params(cfg: ModelConfig, modality: int = 0) -> dict[str, int]:
    """Parameters of one copy of each component in one layer (of `modality`'s tower: Pattention towers may
    hold different token counts)."""
    if not cfg.qk_norm:
        qk_norm = 0
    elif cfg.qk_norm_type == "layernorm_per_head":  # a gain and a bias per head of the queries and of the keys
        qk_norm = 2 * (cfg.n_heads + cfg.kv_heads) * cfg.head_dim
    else:
        qk_norm = 2 * cfg.head_dim
    norm = 2 * cfg.dim + qk_norm  # attention and FFN norms (+ the q/k norms)
    if cfg.projection == "pattention":
        # n tokens of a Pattention in -> out hold n * (in + out) parameters; a token multiplies with all of them
        # once (x K^T, then Theta V), so FLOPs stay 2 x parameters. The modified softmax is O(n), not counted.
        # A shared (tied) projection is the first modality's, as in the model.
        attn = cfg.param_tokens_of("attn", modality if cfg.towers("attn") > 1 else 0)
        ffn = cfg.param_tokens_of("ffn", modality if cfg.towers("ffn") > 1 else 0)
        return {"attn": attn * (cfg.dim + 3 * cfg.dim) + attn * 2 * cfg.dim, "ffn": ffn * 2 * cfg.dim, "norm": norm}
    return {
        "attn": cfg.dim * (2 * cfg.dim + 2 * cfg.kv_dim),  # fused QKV (GQA: narrower K and V) + output
        "ffn": 3 * cfg.dim * cfg.ffn_hidden,  # SwiGLU w1, w3, w2
        "norm": norm,
    }


def _tower_stack(cfg: ModelConfig, modality: int) -> int:
    """Parameters of the tower stack a token of `modality` runs through: every layer and the final norm."""
    return cfg.n_layers * sum(_layer_params(cfg, modality).values()) + cfg.dim


def _latent_io(cfg: ModelConfig, modality: int) -> tuple[int, int, int]:
    """`modality`'s latent projections (0s unless it is a diffusion modality): (parameters, matrix
    parameters of the Linears whose input needs no gradient (input projection, timestep MLP's first layer),
    matrix parameters of the others (timestep MLP's second layer, output projection))."""
    mod = cfg.modalities[modality]
    if not mod.is_diffusion:
        return 0, 0, 0
    d, p = cfg.dim, mod.patch_dim
    leaf = p * d + TIMESTEP_FREQUENCIES * d
    inner = d * d + d * p
    biases = 3 * d + p
    return leaf + inner + biases, leaf, inner


def _matmul_params(cfg: ModelConfig, modality: int) -> int:
    """Matrix parameters one (non-latent) token of `modality` multiplies with: its tower's projections and
    the shared head."""
    layer = _layer_params(cfg, modality)
    return cfg.n_layers * (layer["attn"] + layer["ffn"]) + UnifiedVocab(cfg).size * cfg.dim


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
    total += sum(_latent_io(cfg, m)[0] for m in range(cfg.n_modalities))  # latent projections (diffusion)
    return total, embedding, _tower_stack(cfg, 0)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, attention: AttentionCount) -> float:
    """Forward FLOPs of QK^T and AV for one token, all layers."""
    context = (seq_len + 1) / 2 if attention == "causal" else seq_len
    return cfg.n_layers * 2 * 2 * cfg.dim * context


def attention_pairs(document_ids: torch.Tensor, span_ids: torch.Tensor | None = None) -> int:
    """(query, key) pairs a training mask lets attend, over a (B, T) batch: each packed document's causal
    triangle L (L + 1) / 2 (itself included), plus, inside every bidirectional span of n tokens (a diffusion
    image, `span_ids` >= 0), the n (n - 1) / 2 pairs where a token sees a later one of its span. What
    `document_causal_mask` / `mixed_mask` hold True, counted without the T x T mask; documents and spans
    are contiguous runs of their ids in a row, as the loader and the latent batcher lay them out."""

    def run_lengths(row: torch.Tensor) -> torch.Tensor:
        return torch.unique_consecutive(row, return_counts=True)[1].to(torch.int64)

    total = 0
    for b in range(document_ids.shape[0]):
        lengths = run_lengths(document_ids[b])
        total += int((lengths * (lengths + 1) // 2).sum())
        if span_ids is not None:
            values, counts = torch.unique_consecutive(span_ids[b], return_counts=True)
            n = counts[values >= 0].to(torch.int64)
            total += int((n * (n - 1) // 2).sum())
    return total


def attention_flops(cfg: ModelConfig, pairs: int) -> float:
    """Forward FLOPs of QK^T and AV over `pairs` (query, key) pairs, all layers (backward: twice that)."""
    return cfg.n_layers * 2 * 2 * cfg.dim * pairs


def projection_flops_per_token(cfg: ModelConfig) -> float:
    """Forward + backward FLOPs per token of everything but attention's QK^T and AV (projections, head, latent
    projections), mixed over the modalities' token fractions: the part that does not depend on the mask."""
    return size_report(cfg, 0, attention="full").flops_forward_backward_mixed  # no context: attention is 0


def size_report(cfg: ModelConfig, seq_len: int, attention: AttentionCount = "causal") -> SizeReport:
    total, embedding, one_tower = param_counts(cfg)
    attn = attention_flops_per_token(cfg, seq_len, attention)
    names = [m.name for m in cfg.modalities]
    active, forward, weight_grad_only = {}, {}, {}
    for m, name in enumerate(names):
        matmul = _matmul_params(cfg, m)
        latent, leaf, inner = _latent_io(cfg, m)
        token_attn = attn
        if latent and attention == "causal":  # the rest of its bidirectional span, (n - 1) / 2 keys on average
            token_attn += cfg.n_layers * 2 * 2 * cfg.dim * (cfg.modalities[m].latent_tokens - 1) / 2
        forward[name] = 2 * (matmul + leaf + inner) + token_attn
        # Backward 2x forward, but the weight gradient alone (1x) for the Linears that read the latents and the
        # timestep features: 2 * leaf fewer FLOPs than 3x forward (0 for an AR modality: the same numbers).
        weight_grad_only[name] = 2 * leaf
        active[name] = embedding + _tower_stack(cfg, m) + latent
    mix = _mixture(cfg)
    forward_backward = {n: 3 * forward[n] - weight_grad_only[n] for n in names}
    return SizeReport(
        total_params=total,
        embedding_params=embedding,
        tower_params=one_tower,
        active_params=active,
        active_params_mixed=sum(mix[n] * active[n] for n in names),
        flops_forward=forward,
        flops_forward_backward=forward_backward,
        flops_forward_backward_mixed=sum(mix[n] * 3 * forward[n] - mix[n] * weight_grad_only[n] for n in names),
        attention_flops_forward=attn,
        seq_len=seq_len,
        latent_params=sum(_latent_io(cfg, m)[0] for m in range(cfg.n_modalities)),
    )


# ---------------------------------------------------------------- sampling


def _modality_index(cfg: ModelConfig, modality: int | str) -> int:
    if isinstance(modality, int):
        return modality
    names = [m.name for m in cfg.modalities]
    if modality not in names:
        raise ValueError(f"no modality {modality!r} in {names}")
    return names.index(modality)


def _query_flops(cfg: ModelConfig, matmul_params: int, queries: int, keys: float) -> float:
    """Forward FLOPs of `queries` tokens that each multiply with `matmul_params` and attend to `keys` keys."""
    return queries * (2 * matmul_params + cfg.n_layers * 2 * 2 * cfg.dim * keys)


def diffusion_image_sampling_flops(
    cfg: ModelConfig, modality: int | str, steps: int, prefix_len: int, guidance: bool = False
) -> float:
    """Forward FLOPs to sample one image span of a diffusion modality over a KV cache (inference: no backward).

    With n = latent_tokens, P = prefix_len (the tokens before the span, <boi> included, already cached),
    M = matrix parameters of a latent token (its tower's projections, the shared head, which the model
    runs over every position, and the latent projections: input Linear, timestep MLP, output Linear),
    L layers and width d, one pass of the span whose tokens see `keys` keys costs

        pass(keys) = n * (2 M + 4 L d keys)

    (QK^T and AV, 2 FLOPs per multiply-add each). A denoising pass sees the prefix and the whole span
    bidirectionally (keys = P + n); with classifier-free guidance an unconditional stream, which sees only
    <bod> <boi> and the span (keys = 2 + n), runs beside it at every step. After the last step one clean
    pass (t = 0) of the conditional stream writes the span into the cache for what follows:

        total = steps * pass(P + n) + [guidance] steps * pass(2 + n) + pass(P + n)
    """
    m = _modality_index(cfg, modality)
    mod = cfg.modalities[m]
    if not mod.is_diffusion:
        raise ValueError(f"modality {mod.name!r} is {mod.objective!r}, not 'diffusion'")
    if steps <= 0 or prefix_len < 0:
        raise ValueError(f"need steps > 0 and prefix_len >= 0, got steps={steps}, prefix_len={prefix_len}")
    n = mod.latent_tokens
    _, leaf, inner = _latent_io(cfg, m)
    matmul = _matmul_params(cfg, m) + leaf + inner
    cond = _query_flops(cfg, matmul, n, prefix_len + n)
    uncond = _query_flops(cfg, matmul, n, 2 + n) if guidance else 0.0
    return steps * (cond + uncond) + cond


def ar_image_sampling_flops(
    cfg: ModelConfig, modality: int | str, prefix_len: int, guidance: bool = False, codes: int | None = None
) -> float:
    """Forward FLOPs to sample one image as `codes` discrete codes, one token per step over a KV cache: the
    autoregressive counterpart of `diffusion_image_sampling_flops`, on the same model.

    codes: tokens of one image; default, for a diffusion modality, its VQGAN's codes latent_grid ** 2 (the
    same count as its latent tokens when patch_size is 1). With M = matrix parameters of one image token
    (its tower's projections and the shared head; no latent projections), code i = 1..n, fed back as one
    single-token step, sees the prefix P (<boi> included, already cached) and codes 1..i:

        step(keys) = 2 M + 4 L d keys
        total = sum_{i=1..n} step(P + i) + [guidance] sum_{i=1..n} step(2 + i)
              = n 2 M + 4 L d (n P + n (n + 1) / 2)  [+ the same with P = 2]

    The logits of code 1 come from <boi>'s step, counted with the prefix (as is the diffusion prefix).
    """
    m = _modality_index(cfg, modality)
    mod = cfg.modalities[m]
    if codes is None:
        if not (mod.is_diffusion and mod.latent_grid > 0):
            raise ValueError(f"modality {mod.name!r}: pass codes (tokens per image)")
        codes = mod.latent_grid**2
    if codes <= 0 or prefix_len < 0:
        raise ValueError(f"need codes > 0 and prefix_len >= 0, got codes={codes}, prefix_len={prefix_len}")
    matmul = _matmul_params(cfg, m)
    mean_context = (codes + 1) / 2  # codes 1..i for i = 1..n
    cond = _query_flops(cfg, matmul, codes, prefix_len + mean_context)
    uncond = _query_flops(cfg, matmul, codes, 2 + mean_context) if guidance else 0.0
    return cond + uncond


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
