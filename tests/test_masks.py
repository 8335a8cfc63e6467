"""FlexAttention's document BlockMask and SDPA's boolean document mask give the same model outputs."""

from __future__ import annotations

import torch

from mot.data.loader import document_causal_mask
from mot.model import ModelInputs, MoTTransformer
from mot.model.masks import document_block_mask
from tests.conftest import tiny_config


def test_block_mask_and_boolean_mask_agree(generator):
    cfg = tiny_config(max_seq_len=256)
    model = MoTTransformer(cfg).eval()
    tokens = torch.randint(0, 80, (2, 256), generator=generator)
    # Documents of uneven lengths, some crossing the 128-token tiles.
    lengths = [[100, 60, 96], [7, 200, 49]]
    document_ids = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor(n)) for n in lengths])
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    with torch.no_grad():
        dense = model(ModelInputs(tokens, positions=positions, attn_mask=document_causal_mask(document_ids))).logits
        flex = model(ModelInputs(tokens, positions=positions, attn_mask=document_block_mask(document_ids))).logits
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-5)
    # The mask matters: plain causal attention over the packed sequence gives other outputs.
    causal = model(ModelInputs(tokens, positions=positions)).logits
    assert not torch.allclose(causal, dense, atol=1e-3)
