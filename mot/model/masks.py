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

    create = create_block_mask
    if document_ids.is_cuda:  # eager creation evaluates the mask at all T x T points: ms per batch
        global _compiled_create
        if _compiled_create is None:
            _compiled_create = torch.compile(create_block_mask)
        create = _compiled_create
    return create(same_document_causal, batch, None, seq_len, seq_len, device=document_ids.device)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    global _compiled_flex
    if not q.is_cuda:  # the eager reference (materialises the scores): for tests on the CPU
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)
