"""The model over one KV cache, as generation drives it: a prefill, then one token per row per step."""

from __future__ import annotations

import torch

from mot.model.io import ModelInputs
from mot.model.kv_cache import KVCache
from mot.model.transformer import MoTTransformer


class CachedDecoder:
    """The model over one KV cache: `prefill`, then `step` one token per row; eager or compiled.

    compile=True compiles the single-token step with static shapes (mode="reduce-overhead": CUDA graphs
    on a GPU). A decoder, and its compiled graphs, can be reused for generations of the same shape.
    `span_pass` (the block of a diffusion image span) always runs eager, compiled or not.
    """

    def __init__(self, model: MoTTransformer, rows: int, max_len: int, compile: bool = False):
        self.model = model
        # Slots, not positions: diffusion blocks waste slots in the other rows, so a cache may hold more slots
        # than max_seq_len (the rotary table's length; generate checks the positions against it).
        cfg, weight = model.cfg, model.embed.weight
        self.cache = KVCache(cfg.n_layers, rows, max_len, cfg.kv_heads, cfg.head_dim, weight.dtype, weight.device)
        self.pad = model.vocab.special_id("<pad>")
        device = weight.device
        self.modality_table = model.vocab.modality_of(torch.arange(model.vocab.size, device=device))
        self.compiled = compile
        self._step = model.decode_step
        if compile:
            for tensor in self.cache.tensors():  # updated in place by the graph: fixed addresses
                torch._dynamo.mark_static_address(tensor)
            self._step = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True)

    @property
    def device(self) -> torch.device:
        return self.cache.visible.device

    def prefill(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        visible: torch.Tensor,
        latents: dict[int, torch.Tensor] | None = None,
        span_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(rows, P) prompt -> float32 logits (rows, V) of the next token. Empties the cache first.

        latents: per diffusion modality, the clean latent tokens (N_m, dim) of its placeholder slots in row-major
        order, fed at t = 0; span_ids: (rows, P), -1 outside an image span, k >= 0 inside span k of the row
        (bidirectional inside it)."""
        self.cache.reset()
        timesteps = None
        if latents:
            timesteps = {m: torch.zeros(z.shape[0], device=self.device) for m, z in latents.items()}
        inputs = ModelInputs(tokens, self.modality_table[tokens], positions, latents=latents or None,
                             timesteps=timesteps)
        out = self.model.forward_cached(inputs, self.cache, visible=visible, last_only=True, span_ids=span_ids)
        return out.logits[:, -1].float()

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """(rows,) one token per row -> float32 logits (rows, V) of the next one."""
        tokens, positions, visible = tokens[:, None], positions[:, None], visible[:, None]
        modality = self.modality_table[tokens]
        if not self.compiled:  # eager: attend over the filled slots only
            out = self.model.forward_cached(ModelInputs(tokens, modality, positions), self.cache, visible=visible)
            return out.logits[:, -1].float()
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"KV cache full: {self.cache.max_len} slots")
        slot = torch.tensor(self.cache.length, device=self.device)
        torch.compiler.cudagraph_mark_step_begin()
        logits = self._step(tokens, modality, positions, self.cache, slot, visible)
        self.cache.length += 1
        return logits[:, -1].float()  # a copy: the graph's output buffer is overwritten by the next replay

    def span_pass(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        visible: torch.Tensor,
        latents: dict[int, torch.Tensor],
        timesteps: dict[int, torch.Tensor],
        advance: bool,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One pass of a diffusion block (rows, n), bidirectional inside it -> (float32 logits (rows, V) after
        its last slot, latent predictions). advance=False: the next pass rewrites the same slots."""
        inputs = ModelInputs(tokens, self.modality_table[tokens], positions, latents=latents, timesteps=timesteps)
        out = self.model.forward_cached(inputs, self.cache, visible=visible, last_only=True, advance=advance,
                                        span_ids=torch.zeros_like(tokens))  # the block: one span per row
        return out.logits[:, -1].float(), out.latent_predictions
