"""The whole model: shared embedding and head over the unified vocabulary, MoT blocks between.

Dense is MoT with nothing untied: every component then has one tower, the route
is the identity and the same code runs the same kernels as a plain transformer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from mot.config import ModelConfig
from mot.model.block import AttentionInputs, MoTBlock
from mot.model.io import ModelInputs, ModelOutput
from mot.model.kernels import Kernels
from mot.model.kv_cache import KVCache, LayerWrite
from mot.model.latent_io import LatentProjection
from mot.model.pattention import TowerPattention
from mot.model.rope import RotaryEmbedding
from mot.model.routing import Route, TowerHeadLayerNorm, TowerLinear, TowerRMSNorm, route_tokens
from mot.vocab import UnifiedVocab


def rows_of(flat_modality: torch.Tensor, modality: int, count: int) -> torch.Tensor:
    """The flat indices of the `count` rows of `modality` (as many as its latent tokens), in row-major order.
    While a CUDA graph is captured the count cannot be read back, so it is taken on trust."""
    where = flat_modality == modality
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return torch.nonzero_static(where, size=count).squeeze(1)
    where = where.nonzero().squeeze(1)
    if where.numel() != count:
        raise ValueError(f"modality {modality} has {where.numel()} positions but {count} latent tokens")
    return where


def split_kernel_projections(model: MoTTransformer, dtype: torch.dtype, device: torch.device
                             ) -> list[tuple[str, tuple[int, ...]]]:
    """(name, weight shape) of each projection of several towers that would run on the split kernel with `dtype`
    inputs on `device`: it reads the slice sizes on the host, which a CUDA graph cannot capture. Empty: the
    grouped kernel runs them all."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, TowerLinear):
            weights = [module.weight]
        elif isinstance(module, TowerPattention):
            weights = [module.keys, module.values.transpose(-2, -1)]
        else:
            continue
        for weight in weights:
            x = torch.empty(1, weight.shape[-1], dtype=dtype, device=device)
            if weight.shape[0] > 1 and not model.kernels.grouped(x, torch.empty(weight.shape, dtype=dtype,
                                                                                   device="meta")):
                out.append((name, tuple(weight.shape[1:])))
    return out


class MoTTransformer(nn.Module):
    """The MoT model of a `ModelConfig` (dense: nothing untied).

    `model(ModelInputs(tokens, ...))` gives a `ModelOutput` (mot/model/io.py); generation runs the same inputs over
    a KV cache (`forward_cached`, and the fixed-shape `decode_step` that compiles to CUDA graphs).

    `kernels`: how its tower projections run (mot/model/kernels.py), from `cfg.kernels`. Set another to run the
    same weights on other kernels (tests and benchmarks compare them): every choice computes the same function.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.kernels = Kernels(cfg.kernels)
        self.vocab = UnifiedVocab(cfg)
        self.embed = nn.Embedding(self.vocab.size, cfg.dim)
        self.blocks = nn.ModuleList(MoTBlock(cfg) for _ in range(cfg.n_layers))
        # One final norm per modality when norms are untied; the head itself is shared.
        self.final_norm = TowerRMSNorm(cfg.towers("norm"), cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, self.vocab.size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Diffusion modalities (Transfusion setting): continuous latent tokens in, regression targets out.
        self.latent_io = nn.ModuleDict({m.name: LatentProjection(m.patch_dim, cfg.dim)
                                        for m in cfg.modalities if m.is_diffusion})
        self.diffusion_modalities = {i: m.name for i, m in enumerate(cfg.modalities) if m.is_diffusion}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Residual-branch outputs scaled down with depth (GPT-2), so the stream's variance stays put.
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, std=std)
        for block in self.blocks:
            if self.cfg.projection == "pattention":  # keys like inputs of a linear layer, values like its weight
                for proj, value_std in ((block.attn.qkv, std), (block.attn.out, out_std), (block.ffn.proj, out_std)):
                    proj.reset_parameters(std, value_std)
                continue
            for linear in (block.attn.qkv, block.ffn.w13):
                nn.init.normal_(linear.weight, std=std)
            for linear in (block.attn.out, block.ffn.w2):
                nn.init.normal_(linear.weight, std=out_std)
        for module in self.modules():
            if isinstance(module, TowerRMSNorm | TowerHeadLayerNorm):
                nn.init.ones_(module.weight)
            if isinstance(module, TowerHeadLayerNorm):
                nn.init.zeros_(module.bias)
        for projection in self.latent_io.values():
            projection.reset_parameters(std)

    def route(self, modality: torch.Tensor, tower_counts: Sequence[int] | torch.Tensor | None = None) -> Route:
        """The route of these tokens through the towers, on the model's kernels."""
        route = route_tokens(modality, self.cfg.n_modalities, permute=not self.cfg.is_dense, host_counts=tower_counts)
        return route.with_kernels(self.kernels)

    def hidden_states(self, inputs: ModelInputs) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) final-normed hidden states (the fields: see `ModelInputs`)."""
        tokens = inputs.tokens
        batch, seq_len = tokens.shape
        modality = self._modality(inputs)
        route = self.route(modality, inputs.tower_counts)
        x = self.embed_inputs(tokens, modality, route, inputs.latents, inputs.timesteps)
        x = self.run_blocks(x, route, batch, seq_len, inputs.positions, inputs.attn_mask)
        return route.unsort(x).view(batch, seq_len, -1)

    def _modality(self, inputs: ModelInputs) -> torch.Tensor:
        return self.vocab.modality_of(inputs.tokens) if inputs.modality is None else inputs.modality

    def embed_inputs(
        self,
        tokens: torch.Tensor,
        modality: torch.Tensor,
        route: Route,
        latents: dict[int, torch.Tensor] | None,
        timesteps: dict[int, torch.Tensor] | None,
    ) -> torch.Tensor:
        """(B*T, D) input rows in the route's sorted order: token embeddings, and at the positions of a
        diffusion modality its latent tokens through the input projection plus the timestep embedding."""
        if not latents:  # embed the ids in sorted order: cheaper than permuting the embedded rows
            return self.embed(route.sort(tokens.reshape(-1)))
        x = self.embed(tokens.reshape(-1))
        flat_modality = modality.reshape(-1)
        for m, z in latents.items():
            where = rows_of(flat_modality, m, z.shape[0])
            embedded = self.latent_io[self.diffusion_modalities[m]].embed(z, timesteps[m])
            x = x.index_copy(0, where, embedded.to(x.dtype))
        return route.sort(x)

    def predict_latents(
        self, hidden: torch.Tensor, modality: torch.Tensor, which: dict[int, torch.Tensor] | None
    ) -> dict[int, torch.Tensor]:
        """Per diffusion modality in `which`, the output projection of the hidden states (B, T, D) at its
        positions, in row-major order: (N_m, token_dim). None: empty."""
        if not which:
            return {}
        flat, flat_modality = hidden.reshape(-1, hidden.shape[-1]), modality.reshape(-1)
        return {m: self.latent_io[self.diffusion_modalities[m]].predict(
            flat.index_select(0, rows_of(flat_modality, m, z.shape[0]))) for m, z in which.items()}

    def run_blocks(
        self,
        x: torch.Tensor,
        route: Route,
        batch: int,
        seq_len: int,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Blocks and final norm on (B*T, D) rows in the route's sorted order."""
        cos, sin = self.rope(seq_len, positions)
        inputs = AttentionInputs(batch, seq_len, cos, sin, attn_mask)
        for block in self.blocks:
            x = block(x, route, inputs)
        return self.final_norm(x, route)

    def forward(self, inputs: ModelInputs) -> ModelOutput:
        """Logits (B, T, V) over the unified vocabulary, and the latent predictions of the inputs' latents."""
        if not isinstance(inputs, ModelInputs):
            raise TypeError(f"MoTTransformer takes a ModelInputs, got {type(inputs).__name__}")
        modality = self._modality(inputs)
        hidden = self.hidden_states(replace(inputs, modality=modality))
        return ModelOutput(self.head(hidden), self.predict_latents(hidden, modality, inputs.latents))

    # ------------------------------------------------------------ incremental decoding (mot.generate)

    def forward_cached(
        self,
        inputs: ModelInputs,
        cache: KVCache,
        *,
        visible: torch.Tensor | None = None,
        last_only: bool = False,
        advance: bool = True,
        span_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """The output of t new tokens (B, t) that attend over the cache and themselves.

        Their keys/values go to cache slots [cache.length, cache.length + t); the length advances.
        inputs.positions: default the slots. visible: (B, t) bool, whether later tokens may attend to each
        new one (default all). last_only: logits of the last token only, (B, 1, V). advance=False: the length
        stays, so the next call overwrites these slots (one denoising step of a span). span_ids: (B, t), -1
        outside a span, k >= 0 inside span k: bidirectional inside each span, causal elsewhere (image spans
        under diffusion: a prefill holding clean images, or a block being denoised; see `KVCache.append`).
        """
        if inputs.attn_mask is not None:
            raise ValueError("the cached path makes its own mask")
        tokens = inputs.tokens
        batch, t = tokens.shape
        positions = inputs.positions
        if positions is None:
            positions = (cache.length + torch.arange(t, device=tokens.device)).expand(batch, t)
        if visible is None:
            visible = torch.ones(batch, t, dtype=torch.bool, device=tokens.device)
        writes, mask = cache.append(visible, advance=advance, span_ids=span_ids)
        return self._output_with_cache(replace(inputs, positions=positions), writes, mask, last_only)

    def decode_step(
        self,
        tokens: torch.Tensor,
        modality: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slot: torch.Tensor,
        visible: torch.Tensor,
        tower_counts: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """One token per row (B, 1) written at `slot` (a long tensor) -> logits (B, 1, V).

        Every shape is fixed by the cache, so this compiles once (CUDA graphs) for a whole generation;
        cache.length is left to the caller. Plain tensors in and the logits alone out (a step has no latents),
        so the compiled graph's inputs and output are tensors. tower_counts: the rows per modality, known on
        the host (a captured graph then holds the kernels of that mix: one tower, no routing ops).
        """
        writes, mask = cache.at_slot(slot, visible)
        inputs = ModelInputs(tokens, modality, positions, tower_counts=tower_counts)
        return self._output_with_cache(inputs, writes, mask, last_only=False).logits

    def _output_with_cache(
        self, inputs: ModelInputs, writes: list[LayerWrite], mask: torch.Tensor, last_only: bool
    ) -> ModelOutput:
        tokens = inputs.tokens
        batch, t = tokens.shape
        modality = self._modality(inputs)
        route = self.route(modality, inputs.tower_counts)  # routing works on any rows: here only the new tokens
        x = self.embed_inputs(tokens, modality, route, inputs.latents, inputs.timesteps)
        cos, sin = self.rope(t, inputs.positions)
        # The additive form attention would make of the boolean mask in every layer, made once for all of them
        # (fewer launches per decoding step; the same values)
        mask = torch.zeros(mask.shape, dtype=x.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        for block, write in zip(self.blocks, writes, strict=True):
            x = block(x, route, AttentionInputs(batch, t, cos, sin, mask, write))
        hidden = route.unsort(self.final_norm(x, route)).view(batch, t, -1)
        logits = self.head(hidden[:, -1:] if last_only else hidden)
        return ModelOutput(logits, self.predict_latents(hidden, modality, inputs.latents))

    def tower_parameters(self, tower: int) -> dict[str, torch.Tensor]:
        """The slices of every untied parameter that belong to one tower (for inspection and tests)."""
        out = {}
        for name, module in self.named_modules():
            if isinstance(module, TowerLinear | TowerRMSNorm | TowerHeadLayerNorm) and module.weight.shape[0] > 1:
                out[f"{name}.weight"] = module.weight[tower]
            if isinstance(module, TowerHeadLayerNorm) and module.weight.shape[0] > 1:
                out[f"{name}.bias"] = module.bias[tower]
            if isinstance(module, TowerPattention) and module.keys.shape[0] > 1:
                out[f"{name}.keys"], out[f"{name}.values"] = module.keys[tower], module.values[tower]
        return out
