"""FlexAttention BlockMasks on CUDA against dense SDPA with the boolean mask.

On the CPU, eager `flex_attention` applies only the mask function and ignores the BlockMask's block tables, so
the CPU tests cannot see a wrong table. On CUDA the kernel skips every 128 x 128 tile the table leaves out and
skips the mask function on tiles it lists as full: here a wrong table changes the output. The batches have
documents that cross tile boundaries, bidirectional image spans (the Transfusion setting) inside documents and
across tiles, and a prompt span (a document that opens with an image). Two planted wrong tables (a tile
dropped, a partial tile marked full) must be caught by the same comparison.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from mot.data.synthetic import layout_from_spans, tokens_for_layout
from mot.model import ModelInputs, MoTTransformer
from mot.model.masks import document_block_mask, flex, mixed_block_mask, mixed_mask
from tests.conftest import tiny_config

DEVICE = torch.device("cuda")
SEQ, TILE = 640, 128
# Documents (lengths) and bidirectional spans ([start, end) in the row) of each row of the batch.
DOCUMENTS = [[100, 200, 57, 283], [300, 340]]
SPANS = [[(0, 40), (150, 290), (500, 600)],  # row 0: a prompt span opening document 0, spans across tiles
         [(120, 140), (300, 560)]]           # row 1: one across 128, one opening document 1 across 384 and 512
BF16_ATOL = 2e-2  # bf16 attention output (|v| ~ 1) against the fp32 reference


def document_ids() -> torch.Tensor:
    rows = [torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)]) for lengths in DOCUMENTS]
    ids = torch.stack(rows)
    assert ids.shape[1] == SEQ
    return ids.to(DEVICE)


def span_ids() -> torch.Tensor:
    ids = torch.full((len(SPANS), SEQ), -1)
    k = 0
    for row, spans in enumerate(SPANS):
        for start, end in spans:
            ids[row, start:end] = k
            k += 1
    return ids.to(DEVICE)


def causal_document_mask(documents: torch.Tensor) -> torch.Tensor:
    return mixed_mask(documents, torch.full_like(documents, -1))


def qkv(heads: int = 4, kv_heads: int = 4, head_dim: int = 64, seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = lambda h: (len(DOCUMENTS), h, SEQ, head_dim)
    make = lambda h: torch.randn(shape(h), generator=gen, device=DEVICE, dtype=torch.bfloat16)
    return make(heads), make(kv_heads), make(kv_heads)


def reference(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """SDPA in fp32 with the boolean mask, keys and values repeated for grouped queries."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1).float() for t in (k, v))
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask)


def max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.detach().float() - expected.detach()).abs().max())


def with_tables(mask: BlockMask, kv_num, kv_idx, full_num, full_idx) -> BlockMask:
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=mask.BLOCK_SIZE,
                                    mask_mod=mask.mask_mod, seq_lengths=mask.seq_lengths)


def tables(mask: BlockMask):
    return (mask.kv_num_blocks.clone(), mask.kv_indices.clone(), mask.full_kv_num_blocks.clone(),
            mask.full_kv_indices.clone())


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("kind", ["document", "mixed"])
def test_block_mask_equals_dense_sdpa_with_the_boolean_mask(kind, kv_heads):
    documents, spans = document_ids(), span_ids()
    if kind == "document":
        block, dense = document_block_mask(documents), causal_document_mask(documents)
    else:
        block, dense = mixed_block_mask(documents, spans), mixed_mask(documents, spans)
    assert block.BLOCK_SIZE == (TILE, TILE)
    # The tables skip tiles here (else the test would not exercise them): count the tiles listed.
    listed = int(block.kv_num_blocks.sum() + block.full_kv_num_blocks.sum())
    assert listed < len(DOCUMENTS) * (SEQ // TILE) ** 2
    q, k, v = qkv(kv_heads=kv_heads)
    out = flex(q, k, v, block, enable_gqa=kv_heads != q.shape[1])
    expected = reference(q, k, v, dense)
    error = max_error(out, expected)
    print(f"{kind} kv_heads={kv_heads}: max |flex - SDPA fp32| = {error:.2e} ({listed} tiles listed)")
    assert error < BF16_ATOL
    # bf16 SDPA with the same boolean mask is as far off: the difference is rounding, not masking
    assert error < 2 * max_error(F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True),
                                 expected) + 1e-3


def test_planted_wrong_block_tables_are_caught():
    """A table that drops one tile, and one that marks a partial (diagonal) tile full, give outputs far from
    the dense reference in that tile's rows; the correct table stays within tolerance."""
    documents, spans = document_ids(), span_ids()
    block, dense = mixed_block_mask(documents, spans), mixed_mask(documents, spans)
    q, k, v = qkv(seed=1)
    expected = reference(q, k, v, dense)
    assert max_error(flex(q, k, v, block), expected) < BF16_ATOL
    row, q_tile = 0, 2  # rows 256..383 of batch row 0: document 1's end (a span) and document 2
    rows = slice(q_tile * TILE, (q_tile + 1) * TILE)

    kv_num, kv_idx, full_num, full_idx = tables(block)
    assert kv_num[row, 0, q_tile] > 0, "the tile row must have a partial tile to drop"
    kv_num[row, 0, q_tile] -= 1  # the last-listed partial tile is skipped
    dropped = flex(q, k, v, with_tables(block, kv_num, kv_idx, full_num, full_idx))
    dropped_error = max_error(dropped[row, :, rows], expected[row, :, rows])

    kv_num, kv_idx, full_num, full_idx = tables(block)
    diagonal = int(kv_idx[row, 0, q_tile, : kv_num[row, 0, q_tile]].max())
    assert diagonal == q_tile, "the diagonal tile is partial (causal)"
    keep = kv_idx[row, 0, q_tile, : kv_num[row, 0, q_tile]]
    keep = keep[keep != diagonal]
    kv_idx[row, 0, q_tile, : len(keep)] = keep
    kv_num[row, 0, q_tile] = len(keep)
    full_idx[row, 0, q_tile, full_num[row, 0, q_tile]] = diagonal
    full_num[row, 0, q_tile] += 1
    unmasked = flex(q, k, v, with_tables(block, kv_num, kv_idx, full_num, full_idx))
    unmasked_error = max_error(unmasked[row, :, rows], expected[row, :, rows])

    print(f"planted: dropped tile {dropped_error:.2e}, partial tile marked full {unmasked_error:.2e}")
    assert dropped_error > 10 * BF16_ATOL
    assert unmasked_error > 10 * BF16_ATOL


@pytest.mark.parametrize("kv_heads", [0, 2])
def test_model_with_block_mask_equals_model_with_boolean_mask(kv_heads):
    """The whole bf16 model (routing, rotary positions restarting per document, GQA) gives the same logits and
    gradients with the trainer's BlockMask as with the boolean mask that SDPA takes."""
    torch.manual_seed(0)
    cfg = tiny_config(dim=128, n_heads=4, n_kv_heads=kv_heads, ffn_dim=256, max_seq_len=SEQ, qk_norm=True)
    model = MoTTransformer(cfg).to(DEVICE, torch.bfloat16)
    modality = layout_from_spans([_row(offset) for offset in range(len(DOCUMENTS))])
    tokens = tokens_for_layout(modality, model.vocab, torch.Generator().manual_seed(3)).to(DEVICE)
    documents = document_ids()
    positions = torch.cat([torch.arange(n) for lengths in DOCUMENTS for n in lengths]).view(len(DOCUMENTS), SEQ)
    positions = positions.to(DEVICE)
    results = []
    for mask in (document_block_mask(documents), causal_document_mask(documents)):
        copy_ = copy.deepcopy(model)
        logits = copy_(ModelInputs(tokens, positions=positions, attn_mask=mask)).logits
        logits.float().square().mean().backward()
        results.append((logits.float(), {n: p.grad.float() for n, p in copy_.named_parameters()}))
    (flex_logits, flex_grads), (sdpa_logits, sdpa_grads) = results
    scale = sdpa_logits.abs().max()
    assert max_error(flex_logits, sdpa_logits) < 0.03 * scale
    for name, grad in sdpa_grads.items():
        relative = float((flex_grads[name] - grad).norm() / grad.norm().clamp_min(1e-12))
        assert relative < 0.05, f"{name}: gradient {relative:.2e} off between BlockMask and boolean mask"


def _row(offset: int) -> list[tuple[int, int]]:
    """(modality, length) spans of one row of SEQ tokens: a repeating pattern of all three modalities."""
    pattern = [(0, 37), (1, 91), (2, 60), (0, 13)]
    out, total = [], 0
    for i in range(offset, offset + 100):
        modality, n = pattern[i % len(pattern)]
        n = min(n, SEQ - total)
        if n:
            out.append((modality, n))
        total += n
    return out
