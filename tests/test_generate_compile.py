"""The static decode step traces as one graph and never recompiles from step to step (what CUDA graphs need)."""

from __future__ import annotations

import torch

from mot.generate import GenerationConfig, generate
from mot.generate.decoder import CachedDecoder
from mot.model import MoTTransformer
from tests.conftest import tiny_config


def test_decode_step_is_one_graph_for_the_whole_generation():
    torch._dynamo.reset()
    torch.manual_seed(0)
    # Grouped matmul on the CPU too (it needs bf16): the split fallback reads slice sizes on the host, a graph break.
    model = MoTTransformer(tiny_config(dim=64, ffn_dim=64, kernels="grouped")).to(torch.bfloat16).eval()
    v = model.vocab
    prompt = [v.special_id("<bod>"), v["text"].start + 3, v.special_id("<boi>")]
    config = GenerationConfig(max_new_tokens=10, temperature=0, image_tokens=4, guidance_scale=2.0)

    # The reference is the same static step run eagerly: the generation differs only by the tracing, so the
    # tokens must be identical. (The eager decoder attends over the filled slots only, a different reduction
    # whose bf16 rounding can flip a near-tie; test_generate checks the static step against the full forward.)
    untraced = CachedDecoder(model, 4, len(prompt) + config.max_new_tokens)
    untraced.compiled = True  # the static step, uncompiled
    eager = generate(model, [prompt] * 2, config, untraced)
    decoder = CachedDecoder(model, 4, len(prompt) + config.max_new_tokens)
    decoder._step = torch.compile(model.decode_step, backend="eager", fullgraph=True)  # tracing, no inductor
    decoder.compiled = True
    with torch._dynamo.config.patch(error_on_recompile=True):  # a context manager restores the flag cleanly
        compiled = generate(model, [prompt] * 2, config, decoder)
    assert [r.tokens for r in compiled] == [r.tokens for r in eager]
    assert any(t != compiled[0].tokens[0] for t in compiled[0].tokens)  # not one token repeated
    torch._dynamo.reset()
