"""The model over one KV cache, as generation drives it: a prefill, then one token per row per step."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mot.generate.host import to_device
from mot.model.io import ModelInputs, ModelOutput
from mot.model.kv_cache import KVCache
from mot.model.transformer import MoTTransformer, split_kernel_projections


def varying_shapes():
    """Attention kernels for eager forwards whose key length grows every step: cuDNN's attention builds an
    execution plan per new shape, which cost most of an eager step (bench/NOTES.md, generation 2026-12-03)."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class CachedDecoder:
    """The model over one KV cache: `prefill`, then `step` one token per row; eager, CUDA graphs or compiled.

    - eager (the default): the cached forward over the filled slots. A step's inputs reach the GPU in one
      queued copy, and a step whose rows all sit in one tower (the host knows the tokens it feeds) runs each
      parameter's tower slice as an ordinary layer: no routing ops, so about a dense model's host time.
    - cuda_graph=True (CUDA): the fixed-shape step (every slot under the visible mask) captured as CUDA graphs
      without inductor, then replayed: no compilation, a graph costs one capture (`_replay`).
    - compile=True: the fixed-shape step under torch.compile (mode="reduce-overhead": inductor's kernels and
      CUDA graphs), compiled once per shape.

    A decoder, and its graphs, can be reused for generations of the same shape. `span_pass` (the passes of a
    diffusion image span's block) replays a graph per block under cuda_graph=True, and runs eager otherwise.
    """

    def __init__(self, model: MoTTransformer, rows: int, max_len: int, compile: bool = False,
                 cuda_graph: bool = False):
        if compile and cuda_graph:
            raise ValueError("choose compile or cuda_graph, not both (compile=True already replays CUDA graphs)")
        self.model = model
        # Slots, not positions: diffusion blocks waste slots in the other rows, so a cache may hold more slots
        # than max_seq_len (the rotary table's length; generate checks the positions against it).
        cfg, weight = model.cfg, model.embed.weight
        self.cache = KVCache(cfg.n_layers, rows, max_len, cfg.kv_heads, cfg.head_dim, weight.dtype, weight.device)
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, not {self.device}")
        self.pad = model.vocab.special_id("<pad>")
        self.modality_table = model.vocab.modality_of(torch.arange(model.vocab.size, device=weight.device))
        self._host_modality = self.modality_table.tolist()
        self._towers = cfg.n_modalities
        self.compiled = compile or cuda_graph  # the fixed-shape step
        self.cuda_graph = cuda_graph
        # Steps whose rows mix towers can be captured where the grouped matmul runs every tower projection.
        self._mixed_capturable = cuda_graph and not split_kernel_projections(model, weight.dtype, weight.device)
        self._block: tuple | None = None  # the diffusion block's graph: (key, graph, static inputs, outputs)
        self._graphs: dict[tuple[int, ...] | None, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._step = model.decode_step
        if compile:
            for tensor in self.cache.tensors():  # updated in place by the graph: fixed addresses
                torch._dynamo.mark_static_address(tensor)
            self._step = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True)

    @property
    def device(self) -> torch.device:
        return self.cache.visible.device

    def tower_counts(self, tokens: Sequence[int]) -> tuple[int, ...]:
        """Tokens per modality of host ids (what the route needs to skip its sort, without a sync)."""
        counts = [0] * self._towers
        for token in tokens:
            counts[self._host_modality[token]] += 1
        return tuple(counts)

    def prefill(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        visible: torch.Tensor,
        latents: dict[int, torch.Tensor] | None = None,
        span_ids: torch.Tensor | None = None,
        tower_counts: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """(rows, P) prompt -> float32 logits (rows, V) of the next token. Empties the cache first.

        latents: per diffusion modality, the clean latent tokens (N_m, dim) of its placeholder slots in row-major
        order, fed at t = 0; span_ids: (rows, P), -1 outside an image span, k >= 0 inside span k of the row
        (bidirectional inside it). tower_counts: the prompt's tokens per modality, counted on the host."""
        self.cache.reset()
        timesteps = None
        if latents:
            timesteps = {m: torch.zeros(z.shape[0], device=self.device) for m, z in latents.items()}
        inputs = ModelInputs(tokens, self.modality_table[tokens], positions, latents=latents or None,
                             timesteps=timesteps, tower_counts=tower_counts)
        with varying_shapes():
            out = self.model.forward_cached(inputs, self.cache, visible=visible, last_only=True, span_ids=span_ids)
        return out.logits[:, -1].float()

    def step(self, tokens: Sequence[int], positions: Sequence[int], visible: Sequence[bool]) -> torch.Tensor:
        """One token per row, given on the host -> float32 logits (rows, V) of the next one."""
        if self.compiled and self.cache.length >= self.cache.max_len:
            raise ValueError(f"KV cache full: {self.cache.max_len} slots")
        rows = len(tokens)
        packed = to_device([tokens, positions, [int(v) for v in visible], [self.cache.length] * rows], self.device)
        tokens_, positions_, visible_ = packed[0, :, None], packed[1, :, None], packed[2, :, None].bool()
        if not self.compiled:  # eager: attend over the filled slots only
            inputs = ModelInputs(tokens_, self.modality_table[tokens_], positions_,
                                 tower_counts=self.tower_counts(tokens))
            with varying_shapes():
                return self.model.forward_cached(inputs, self.cache, visible=visible_).logits[:, -1].float()
        if self.cuda_graph:
            logits = self._replay(packed, self.tower_counts(tokens))
        else:
            torch.compiler.cudagraph_mark_step_begin()
            logits = self._step(tokens_, self.modality_table[tokens_], positions_, self.cache, packed[3, :1],
                                visible_)
        self.cache.length += 1
        # A copy: the graph's output buffer is overwritten by the next replay.
        return logits[:, -1].to(torch.float32, copy=True)

    def _replay(self, packed: torch.Tensor, tower_counts: tuple[int, ...]) -> torch.Tensor:
        """The static step through a CUDA graph. One graph per mix of towers a step can have: a graph per tower
        for steps whose rows all sit in it (ordinary layers on its slices), one for mixed steps (the grouped
        matmul; where it cannot run, those steps go eager). Each is captured at its first step, after one
        warm-up run (`_capture`)."""
        key = tower_counts if max(tower_counts) == sum(tower_counts) else None  # one tower: its own graph
        if key is None and not self._mixed_capturable:  # eager, uncaptured
            return self._static_step(packed, None)
        if key not in self._graphs:
            static = packed.clone()
            graph, logits = self._capture(lambda: self._static_step(static, key))
            self._graphs[key] = (graph, static, logits)
        graph, static, logits = self._graphs[key]
        static.copy_(packed)
        graph.replay()
        return logits

    def _static_step(self, packed: torch.Tensor, tower_counts: tuple[int, ...] | None) -> torch.Tensor:
        tokens = packed[0, :, None]
        return self.model.decode_step(tokens, self.modality_table[tokens], packed[1, :, None], self.cache,
                                      packed[3, :1], packed[2, :, None].bool(), tower_counts)

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
        its last slot, latent predictions). advance=False: the next pass rewrites the same slots.

        With cuda_graph=True the passes of one block (the same slots, rows and shapes; only the latents and
        their times change) replay one CUDA graph, captured at the block's first pass, where the grouped matmul
        runs the towers (`split_kernel_projections`)."""
        if not self._mixed_capturable:  # eager (a block's rows mix towers: placeholders and pads)
            with varying_shapes():
                out = self._block_pass(tokens, positions, visible, latents, timesteps, advance)
            return out.logits[:, -1].float(), out.latent_predictions
        key = (self.cache.length, *tokens.shape, *[(m, z.shape[0]) for m, z in sorted(latents.items())])
        if self._block is None or self._block[0] != key:
            self._block = None  # the previous block's graph and buffers go first
            static = (tokens.clone(), positions.clone(), visible.clone(), {m: z.clone() for m, z in latents.items()},
                      {m: t.clone() for m, t in timesteps.items()})
            graph, out = self._capture(lambda: self._block_pass(*static))
            self._block = (key, graph, static, out)
        _, graph, static, (logits, predictions) = self._block
        for target, source in zip(static[:3], (tokens, positions, visible), strict=True):
            target.copy_(source)
        for m in latents:
            static[3][m].copy_(latents[m])
            static[4][m].copy_(timesteps[m])
        graph.replay()
        if advance:
            self.cache.length += tokens.shape[1]
        return logits[:, -1].to(torch.float32, copy=True), {m: p.clone() for m, p in predictions.items()}

    def _block_pass(self, tokens, positions, visible, latents, timesteps, advance: bool = False) -> ModelOutput:
        inputs = ModelInputs(tokens, self.modality_table[tokens], positions, latents=latents, timesteps=timesteps)
        return self.model.forward_cached(inputs, self.cache, visible=visible, last_only=True, advance=advance,
                                         span_ids=torch.zeros_like(tokens))  # the block: one span per row

    def _capture(self, run):
        """A CUDA graph of `run()` and its outputs, after one warm-up run on a side stream (it writes the cache
        slots the replays then write again) so that workspaces are allocated outside the graph."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        return graph, out
