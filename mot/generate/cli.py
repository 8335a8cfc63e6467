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
from pathlib import Path

from mot.generate.prompt import THEN, GenerationError
from mot.generate.session import DECODING, GenerationRequest, Session
from mot.model.transformer import MoTTransformer
from mot.tokenize.base import TokenizerError


def request_of(args: argparse.Namespace) -> GenerationRequest:
    return GenerationRequest(
        prompt=args.prompt, image=args.image, audio=args.audio, then=args.then, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, max_tokens=args.max_tokens,
        guidance_scale=args.guidance_scale, samples=args.samples, speech_max_tokens=args.speech_max_tokens,
        diffusion_steps=args.diffusion_steps, diffusion_eta=args.diffusion_eta)


def run(args: argparse.Namespace, model: MoTTransformer, tokenizer_folder: Path | None) -> list[Path]:
    """Generate and write the page for a loaded model (eval mode); returns the files written."""
    from mot.generate.page import generate_page  # torchvision and soundfile: only when generating

    session = Session(model, tokenizer_folder, args.device, args.precision, decoding_of(args))
    if not session.tokenizers:
        print(f"note: no tokenizers found ({tokenizer_folder}): the page shows raw ids", file=sys.stderr)
    if session.config(request_of(args)).image_tokens is None and "image" in session.modalities:
        print("note: no image tokenizer: the model may not open image spans", file=sys.stderr)
    return generate_page(session, request_of(args), args.out, args.ckpt)


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from mot.runs import CheckpointError, load_for_inference

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
    p.add_argument("--decoding", choices=DECODING, default="auto",
                   help="decode steps: graph = CUDA graphs captured without compiling (auto on a GPU), compile = "
                        "torch.compile's kernels + CUDA graphs (a minute of compilation per shape), eager (auto "
                        "on the CPU)")
    p.add_argument("--compile", action="store_true", help="the same as --decoding compile")


def decoding_of(args: argparse.Namespace) -> str:
    return "compile" if args.compile else args.decoding


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="interleaved text, images and speech from a prompt, as an HTML page")
    add_arguments(p)
    p.set_defaults(func=cmd_generate)
