"""A preallocated key/value cache for incremental decoding, one (B, H, max_len, D) pair per layer.

Slots are positions in the cache, one token each, the same for every row; a row's rotary
positions are separate and given by the caller (left padding, guidance streams). Which
earlier slots a row's queries may see is the `visible` flag written with each token:
left padding and the hidden part of an unconditional stream are written invisible. A
token always sees itself, so a row with nothing visible still gets finite attention
(an all-masked softmax is NaN, and a NaN value times a zero weight poisons every row).

Two ways to write:
- `append` (prefill, eager decoding): the new tokens go to slots [length, length + t) and
  attention reads slots [0, length + t); shapes change with the length.
- `at_slot` (the static decode step): one token goes to `slot`, a 0-d tensor, with
  `index_copy_`, and attention reads all max_len slots under the visible mask. Every shape is
  fixed, so the step compiles once and replays as a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerWrite:
    """One layer's slice of a cache write: stores the new keys/values and returns what to attend over."""

    k: torch.Tensor  # (B, H, max_len, D), the layer's cache
    v: torch.Tensor
    start: int | torch.Tensor  # first slot written: an int (append) or a (1,) tensor (static step)

    def __call__(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.start, int):
            stop = self.start + k_new.shape[2]
            self.k[:, :, self.start : stop] = k_new
            self.v[:, :, self.start : stop] = v_new
            return self.k[:, :, :stop], self.v[:, :, :stop]
        self.k.index_copy_(2, self.start, k_new.to(self.k.dtype))
        self.v.index_copy_(2, self.start, v_new.to(self.v.dtype))
        return self.k, self.v


class KVCache:
    """Keys and values of every layer for `batch` rows of up to `max_len` tokens, allocated once."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        max_len: int,
        n_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (batch, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.visible = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.slots = torch.arange(max_len, device=device)
        self.batch, self.max_len, self.length = batch, max_len, 0

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> KVCache:
        """A cache shaped for `model` (an MoTTransformer), in its parameters' dtype and device."""
        cfg, weight = model.cfg, model.embed.weight
        if max_len > cfg.max_seq_len:
            raise ValueError(f"a cache of {max_len} tokens exceeds model.max_seq_len ({cfg.max_seq_len})")
        return cls(cfg.n_layers, batch, max_len, cfg.kv_heads, cfg.head_dim, weight.dtype, weight.device)

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer the decode step writes (to mark as static addresses for CUDA graphs)."""
        return [*self.k, *self.v, self.visible]

    def reset(self) -> None:
        self.visible.zero_()
        self.length = 0

    def _check_room(self, t: int) -> None:
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {t} tokens exceed its {self.max_len} slots")

    def append(
        self,
        visible: torch.Tensor,
        advance: bool = True,
        span_ids: torch.Tensor | None = None,
    ) -> tuple[list[LayerWrite], torch.Tensor]:
        """Writes for t new tokens at slots [length, length + t), and their attention mask (B, 1, t, length + t).

        visible: (B, t) bool, whether later tokens of the row may attend to each new token.
        span_ids: (B, t) long, -1 outside a bidirectional span, k >= 0 inside span k of the new tokens: a new
        token also sees the later new tokens of its own span (visible ones), as `mixed_mask` does in training
        (a prompt holding an image span; all zeros: a block that is one image span under diffusion). Spans lie
        within one append.
        advance: move `length` past them (call once per forward); False leaves it, so that the next append
        overwrites the same slots (the denoising steps of a span).
        """
        t = visible.shape[1]
        self._check_room(t)
        start, stop = self.length, self.length + t
        self.visible[:, start:stop] = visible
        keys = self.slots[:stop]
        query = self.slots[start:stop, None]  # (t, 1)
        seen = keys <= query
        if span_ids is not None:
            same = (span_ids[:, :, None] == span_ids[:, None, :]) & (span_ids[:, :, None] >= 0)  # (B, t, t)
            later = torch.zeros(span_ids.shape[0], t, stop, dtype=torch.bool, device=span_ids.device)
            later[:, :, start:] = same
            seen = seen | later
        mask = (self.visible[:, None, :stop] & seen) | (keys == query)  # (B, t, stop)
        if advance:
            self.length = stop
        return [LayerWrite(k, v, start) for k, v in zip(self.k, self.v, strict=True)], mask[:, None]

    def at_slot(self, slot: torch.Tensor, visible: torch.Tensor) -> tuple[list[LayerWrite], torch.Tensor]:
        """Writes for one token per row at `slot` (a 0-d or (1,) long tensor), and its mask (B, 1, 1, max_len).

        Static shapes for a compiled step; slots after `slot` are unwritten, hence invisible. Does not
        touch `length`: the caller owns it.
        """
        slot = slot.reshape(1)
        self.visible.index_copy_(1, slot, visible.reshape(-1, 1))
        mask = self.visible | (self.slots == slot)  # (B, max_len)
        return [LayerWrite(k, v, slot) for k, v in zip(self.k, self.v, strict=True)], mask[:, None, None]

    def hide(self, row: int, start: int, stop: int) -> None:
        """Make slots [start, stop) of one row invisible to its later tokens (a guidance stream restarting)."""
        self.visible[row, start:stop] = False
