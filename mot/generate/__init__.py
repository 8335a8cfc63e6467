"""Interleaved generation: KV-cached decoding, modality-constrained sampling, classifier-free guidance, the page.

    model, cfg, tokenizer_folder = load_for_inference("runs/demo")
    tokenizers = load_tokenizers(tokenizer_folder, model.vocab)
    prompt = build_prompt(model.vocab, tokenizers, "a red circle on the left", then="image")
    results = generate(model, [prompt] * 4, GenerationConfig(image_tokens=64, guidance_scale=3, seed=0))
    write_page("gen/page.html", model.vocab, tokenizers, results)   # from mot.generate.page (imports torchvision)

With a diffusion image modality (Transfusion setting) image spans are denoised inside the same loop:

    codecs = load_span_codecs(model, tokenizer_folder)              # from mot.generate.diffusion
    config = GenerationConfig(image_tokens=codecs["image"].tokens_per_image, diffusion_clip=codecs["image"].bound,
                              diffusion_steps=50, guidance_scale=3, seed=0)
    results = generate(model, [prompt] * 4, config)                 # results[i].latents: (n, token_dim) per image
    write_page("gen/page.html", model.vocab, tokenizers, results, codecs=codecs)
"""

from mot.generate.constraints import ModalityConstraints, SpanState
from mot.generate.decoder import CachedDecoder
from mot.generate.loop import Generation, GenerationConfig, generate
from mot.generate.prompt import GenerationError, build_prompt, load_tokenizers
from mot.generate.sampling import SamplingConfig, filter_logits, sample
from mot.generate.spans import Span, split_spans

__all__ = [
    "CachedDecoder", "Generation", "GenerationConfig", "GenerationError", "ModalityConstraints", "SamplingConfig",
    "Span", "SpanState", "build_prompt", "filter_logits", "generate", "load_tokenizers", "sample", "split_spans",
]
