"""Attention masks for packed documents: a dense boolean mask (any device, SDPA) or a FlexAttention
BlockMask (CUDA), which lets the kernel skip every 128x128 tile that lies wholly outside the mask.

Both say the same thing: query t may attend to key s iff s <= t and both are in the same document.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# Compiled once: flex_attention runs as a fused Triton kernel only under torch.compile.
_compiled_flex = None
_compiled_create = None


def document_block_mask(document_ids: torch.Tensor) -> BlockMask:
    """(B, T) document ids (on the device) -> a causal, document-restricted BlockMask."""
    batch, seq_len = document_ids.shape

    def same_document_causal(b, h, q, kv):
        return (document_ids[b, q] == document_ids[b, kv]) & (q >= kv)

    return _create(same_document_causal, batch, seq_len, document_ids.device)


def _create(mask_mod, batch: int, seq_len: int, device: torch.device) -> BlockMask:
    create = create_block_mask
    if device.type == "cuda":  # eager creation evaluates the mask at all T x T points: ms per batch
        global _compiled_create
        if _compiled_create is None:
            _compiled_create = torch.compile(create_block_mask)
        create = _compiled_create
    return create(mask_mod, batch, None, seq_len, seq_len, device=device)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, enable_gqa: bool = False
         ) -> torch.Tensor:
    global _compiled_flex
    if not q.is_cuda:  # the eager reference (materialises the scores): for tests on the CPU
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def mixed_mask(document_ids: torch.Tensor, span_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids and bidirectional-span ids (-1 outside a span, k >= 0 inside span k) -> a boolean
    (B, 1, T, T) mask for the Transfusion setting: causal across the sequence, bidirectional inside each
    image span (a span token also sees later tokens of its own span), never across documents."""
    seq_len = document_ids.shape[-1]
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids.device).tril()
    same_span = (span_ids[:, :, None] == span_ids[:, None, :]) & (span_ids[:, :, None] >= 0)
    return (same_doc & (causal | same_span))[:, None]


def mixed_block_mask(document_ids: torch.Tensor, span_ids: torch.Tensor) -> BlockMask:
    """The FlexAttention form of `mixed_mask`."""
    batch, seq_len = document_ids.shape

    def mask_mod(b, h, q, kv):
        same_span = (span_ids[b, q] == span_ids[b, kv]) & (span_ids[b, q] >= 0)
        return (document_ids[b, q] == document_ids[b, kv]) & ((q >= kv) | same_span)

    return _create(mask_mod, batch, seq_len, document_ids.device)
