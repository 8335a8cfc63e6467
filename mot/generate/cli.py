"""`mot generate`: a checkpoint and a prompt in, an HTML page with text, images and speech out.

    mot generate --ckpt runs/demo --prompt "a red circle on the left" --then image --out gen/page.html
    mot generate --ckpt runs/demo --image shape.png --out gen/caption.html            (captioning)
    mot generate --ckpt runs/demo --prompt "a blue square" --samples 4 --guidance-scale 3 --out gen/p.html

A checkpoint whose image modality is trained with the diffusion objective (Transfusion setting) samples
its images by denoising latents (--diffusion-steps, --diffusion-eta), decoded by the VQGAN's decoder; a prompt
image (--image) goes in as its clean latent tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mot.config import ConfigError
from mot.generate.diffusion import load_span_codecs
from mot.generate.loop import CachedDecoder, GenerationConfig, cache_slots, generate
from mot.generate.prompt import THEN, GenerationError, build_prompt, image_grid_of, latent_prompt, load_tokenizers
from mot.model.transformer import MoTTransformer
from mot.tokenize.base import TokenizerError


def generation_config(args: argparse.Namespace, tokenizers: dict[str, Any], model: MoTTransformer,
                      codecs: dict[str, Any] | None = None) -> GenerationConfig:
    """The loop's settings from the options; image and speech generation need a tokenizer to decode them.
    codecs: the latent codec of a diffusion image modality (`diffusion_codecs`): its spans hold latent tokens."""
    names = [r.name for r in model.vocab.ranges]
    image_tokens, clip = None, None
    if "image" in names and "image" in tokenizers:
        h, w = image_grid_of(tokenizers["image"])
        image_tokens = h * w
    if codecs and "image" in codecs:
        image_tokens, clip = codecs["image"].tokens_per_image, codecs["image"].bound
    speech_cap = args.speech_max_tokens if "speech" in names and "speech" in tokenizers else None
    return GenerationConfig(
        max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, guidance_scale=args.guidance_scale, image_tokens=image_tokens,
        speech_max_tokens=speech_cap, usable_ids={name: tok.vocab_size for name, tok in tokenizers.items()},
        diffusion_steps=args.diffusion_steps, diffusion_eta=args.diffusion_eta, diffusion_clip=clip,
    )


def diffusion_codecs(model: MoTTransformer, tokenizers: dict[str, Any], tokenizer_folder: Path | None,
                     ) -> dict[str, Any]:
    """The latent codec of a diffusion image modality, by name; {} when there is none or no image tokenizer."""
    if "image" not in tokenizers:
        return {}
    try:
        return load_span_codecs(model, tokenizer_folder, where=f"tokenizers {tokenizer_folder}")
    except ConfigError as err:
        raise GenerationError(str(err)) from None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GenerationError("--device cuda: no CUDA device is available")
    return torch.device(name)


def run(args: argparse.Namespace, model: MoTTransformer, tokenizer_folder: Path | None) -> list[Path]:
    """Generate and write the page for a loaded model (eval mode); returns the files written."""
    from mot.generate.page import write_page  # torchvision and soundfile: only when generating

    tokenizers = load_tokenizers(tokenizer_folder, model.vocab)
    if not tokenizers:
        print(f"note: no tokenizers found ({tokenizer_folder}): the page shows raw ids", file=sys.stderr)
    codecs = diffusion_codecs(model, tokenizers, tokenizer_folder)
    prompt = build_prompt(model.vocab, tokenizers, args.prompt, args.image, args.audio, args.then)
    # A diffusion image modality holds the prompt's image as its clean latent tokens (placeholder ids in `prompt`).
    prompt, prompt_latents = latent_prompt(model.vocab, codecs, prompt)
    config = generation_config(args, tokenizers, model, codecs)
    if config.image_tokens is None and "image" in [r.name for r in model.vocab.ranges]:
        print("note: no image tokenizer: the model may not open image spans", file=sys.stderr)
    if args.samples <= 0:
        raise GenerationError(f"--samples must be positive, got {args.samples}")
    if len(prompt) + args.max_tokens > model.cfg.max_seq_len:
        raise GenerationError(f"the prompt ({len(prompt)} tokens) plus --max-tokens {args.max_tokens} exceeds the "
                              f"model's max_seq_len {model.cfg.max_seq_len}")
    device = _device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda") \
        else torch.float32
    if args.compile and (device.type != "cuda" or dtype != torch.bfloat16):
        # The compiled step must be one graph: MoT's grouped matmul runs on CUDA in bf16 only.
        raise GenerationError("--compile needs a CUDA device and bf16 precision")
    model = model.to(device=device, dtype=dtype)
    decoder = None
    try:
        if args.compile:  # diffusion blocks run eager between the compiled steps
            rows = args.samples * (2 if config.guided else 1)
            decoder = CachedDecoder(model, rows, cache_slots(model, [prompt] * args.samples, config), compile=True)
        start = time.perf_counter()
        results = generate(model, [prompt] * args.samples, config, decoder,
                           [prompt_latents] * args.samples if prompt_latents else None)
    except ValueError as err:
        raise GenerationError(str(err)) from None
    seconds = time.perf_counter() - start
    new = sum(len(r.tokens) for r in results)
    print(f"generated {new} tokens in {seconds:.1f} s ({new / seconds:.1f} tokens/s) on {device}")
    settings = {"ckpt": args.ckpt, "prompt": args.prompt, "image": args.image, "audio": args.audio,
                "then": args.then, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                "seed": args.seed, "max_tokens": args.max_tokens, "guidance_scale": args.guidance_scale,
                "samples": args.samples, "image_tokens": config.image_tokens,
                "speech_max_tokens": config.speech_max_tokens}
    if codecs:
        settings.update(diffusion_steps=config.diffusion_steps, diffusion_eta=config.diffusion_eta)
    return write_page(args.out, model.vocab, tokenizers, results, settings, codecs)


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from mot.train.checkpoint import CheckpointError, load_for_inference

    try:
        if overrides:
            raise GenerationError(f"mot generate takes no recipe overrides, got {overrides}")
        model, _, tokenizer_folder = load_for_inference(args.ckpt)
        files = run(args, model, tokenizer_folder)
    except (GenerationError, CheckpointError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="a checkpoint folder (step-*) or a run folder (its latest)")
    p.add_argument("--prompt", default="", help="text; it comes after --image / --audio in the prompt document")
    p.add_argument("--image", default=None, help="an image for the prompt (captioning: image in, text out)")
    p.add_argument("--audio", default=None, help="an audio file for the prompt")
    p.add_argument("--then", choices=list(THEN), default="auto",
                   help="what follows the prompt: the model's choice, or an image (<boi>) or speech (<bos>) span")
    p.add_argument("--out", required=True, help="the HTML page; PNG, WAV and JSON files are written next to it")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely ids; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per sample, image spans included")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance inside image and speech spans (1 = off; 3-5 is usual for images)")
    p.add_argument("--samples", type=int, default=1, help="samples of the same prompt, generated as one batch")
    p.add_argument("--speech-max-tokens", type=int, default=500, help="cap on the units of one speech span")
    p.add_argument("--diffusion-steps", type=int, default=50,
                   help="denoising steps per image (a checkpoint whose image modality is trained with diffusion)")
    p.add_argument("--diffusion-eta", type=float, default=1.0,
                   help="ddpm_cosine schedule: 1 = ancestral DDPM, 0 = deterministic DDIM (flow: not used)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on a GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on a GPU)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="interleaved text, images and speech from a prompt, as an HTML page")
    add_arguments(p)
    p.set_defaults(func=cmd_generate)
