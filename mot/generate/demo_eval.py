"""What a model trained on the demo corpus can do, measured with the corpus' own pixel checker.

    report = colour_match(model, tokenizers, per_colour=8)     # text -> image: does the colour match?
    files = write_demo_samples("runs/demo")                     # the README main job's samples page

For each palette colour the model gets captions "a <colour> <shape> in the center" and generates an image;
the image's dominant non-background colour (`mot.data.checker.dominant_colour`) either is the named colour
or not. Chance is 1 / number of colours. With a diffusion image modality the images are denoised latents,
decoded by the VQGAN's decoder through the modality's `LatentCodec`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import save_image

from mot.data.checker import dominant_colour
from mot.data.demo import COLOURS, PHRASES, SHAPES, caption_of
from mot.generate.diffusion import load_span_codecs
from mot.generate.loop import Generation, GenerationConfig, generate
from mot.generate.prompt import build_prompt, image_grid_of, load_tokenizers
from mot.generate.session import GenerationRequest, Session
from mot.generate.spans import split_spans
from mot.model.transformer import MoTTransformer


def colour_prompts(per_colour: int) -> list[tuple[str, str]]:
    """(colour, caption) pairs: every colour with shapes in turn, drawn in the center."""
    return [(colour, caption_of([{"colour": colour, "shape": SHAPES[k % len(SHAPES)], "position": "center"}]))
            for colour in COLOURS for k in range(per_colour)]


def decoded_images(result: Generation, model: MoTTransformer, tokenizer: Any, codec: Any = None) -> list[torch.Tensor]:
    """The generated images of one sample: its image spans' codes, or with `codec` (a diffusion modality) its
    latents, through the VQGAN decoder."""
    if codec is not None:
        return [tokenizer.decode_latents(codec.tokens_to_latents(z[None]))[0].float().cpu() for z in result.latents]
    h, w = image_grid_of(tokenizer)
    spans = [s for s in split_spans(result.prompt + result.tokens, model.vocab)
             if s.kind == "image" and s.closed and len(s.ids) == h * w]
    return [tokenizer.decode(torch.tensor(s.ids)).float().cpu() for s in spans]


@torch.no_grad()
def colour_match(model: MoTTransformer, tokenizers: dict[str, Any], per_colour: int = 8,
                 guidance_scale: float = 3.0, seed: int = 0, out_dir: Path | None = None,
                 codecs: dict[str, Any] | None = None, diffusion_steps: int = 50) -> dict[str, Any]:
    """Generate one image per caption; the share whose dominant colour is the caption's colour.

    codecs: the `LatentCodec` of a diffusion image modality by name (`mot.generate.diffusion.load_span_codecs`);
    required when the image modality is trained with diffusion."""
    if "center" not in PHRASES:
        raise ValueError("the demo corpus has no 'center' position")
    image, codec = tokenizers["image"], (codecs or {}).get("image")
    if codec is None and "image" in model.diffusion_modalities.values():
        raise ValueError("the image modality is trained with diffusion: colour_match needs its latent codec")
    h, w = image_grid_of(image)
    span = codec.tokens_per_image if codec is not None else h * w
    pairs = colour_prompts(per_colour)
    prompts = [build_prompt(model.vocab, tokenizers, caption, then="image") for _, caption in pairs]
    config = GenerationConfig(max_new_tokens=span + 2, seed=seed, guidance_scale=guidance_scale, image_tokens=span,
                              usable_ids={n: t.vocab_size for n, t in tokenizers.items()},
                              diffusion_steps=diffusion_steps, diffusion_clip=codec.bound if codec else None)
    results = generate(model, prompts, config)
    per = {c: [0, 0] for c in COLOURS}
    images = []
    for (colour, _), result in zip(pairs, results, strict=True):
        found = decoded_images(result, model, image, codec)
        per[colour][1] += 1
        if found:
            per[colour][0] += dominant_colour(found[0]) == colour
            images.append(found[0])
        else:
            images.append(torch.ones(3, h * 8, w * 8))
    hits = sum(v[0] for v in per.values())
    report = {"rate": hits / len(pairs), "chance": 1 / len(COLOURS), "images": len(pairs),
              "guidance_scale": guidance_scale, "per_colour": {c: v[0] / v[1] for c, v in per.items()}}
    if out_dir is not None:  # one row per colour, in caption order
        save_image(torch.stack(images), out_dir / "colour_grid.png", nrow=per_colour, padding=2, pad_value=1.0)
    return report


def write_demo_samples(run_dir: str | Path, per_colour: int = 8, guidance_scale: float = 3.0) -> dict[str, Any]:
    """The demo run's samples: colour-match score and grid, and an HTML page of a few prompts."""
    from mot.generate.page import generate_page  # torchvision and soundfile: only when writing pages
    from mot.runs import load_for_inference

    run_dir = Path(run_dir)
    out = run_dir / "samples"
    out.mkdir(parents=True, exist_ok=True)
    model, _, tokenizer_folder = load_for_inference(run_dir)
    tokenizers = load_tokenizers(tokenizer_folder, model.vocab)
    codecs = load_span_codecs(model, tokenizer_folder, where=f"{run_dir}/tokenizers")
    report = colour_match(model, tokenizers, per_colour, guidance_scale, out_dir=out, codecs=codecs)
    (out / "colour_match.json").write_text(json.dumps(report, indent=1))

    session = Session(model, tokenizer_folder)
    pages = []
    for name, request in (("text_to_image", GenerationRequest(
                              prompt="a green square on the left and a red circle on the right", then="image",
                              guidance_scale=guidance_scale, max_tokens=120, samples=2)),
                          ("speech", GenerationRequest(prompt="a blue triangle at the top", then="speech",
                                                       speech_max_tokens=100, max_tokens=120, samples=2)),
                          ("free", GenerationRequest(prompt="", max_tokens=200, samples=2))):
        pages.append(str(generate_page(session, request, out / f"{name}.html", run_dir)[0]))  # the page first
    report["pages"] = pages
    report["grid"] = str(out / "colour_grid.png")
    return report
