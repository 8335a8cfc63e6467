"""A loaded model ready to generate: its tokenizers, latent codecs, device and dtype, and one request at a time.

    session = Session(model, tokenizer_folder, device="auto")
    results = session.generate(GenerationRequest(prompt="a red circle", then="image", guidance_scale=3))

`mot generate` writes the results as a page; `mot serve` streams them to a browser. A request is checked
against the model before any work (`GenerationError` names what is wrong).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mot.config import ConfigError
from mot.generate.decoder import CachedDecoder
from mot.generate.diffusion import load_span_codecs
from mot.generate.loop import Generation, GenerationConfig, cache_slots, generate
from mot.generate.prompt import THEN, GenerationError, build_prompt, image_grid_of, latent_prompt, load_tokenizers
from mot.model.transformer import MoTTransformer


@dataclass
class GenerationRequest:
    prompt: str = ""  # text; it comes after `image` / `audio` in the prompt document
    image: str | None = None  # an image file for the prompt
    audio: str | None = None  # an audio file for the prompt
    then: str = "auto"  # what follows the prompt: the model's choice, "image" (<boi>) or "speech" (<bos>)
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 256  # new tokens per sample, image spans included
    guidance_scale: float = 1.0  # classifier-free guidance inside image and speech spans (1 = off)
    samples: int = 1  # generated as one batch
    speech_max_tokens: int = 500
    diffusion_steps: int = 50  # a diffusion image modality's denoising steps
    diffusion_eta: float = 1.0

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GenerationError("--device cuda: no CUDA device is available")
    return torch.device(name)


def diffusion_codecs(model: MoTTransformer, tokenizers: dict[str, Any], tokenizer_folder: Path | None,
                     ) -> dict[str, Any]:
    """The latent codec of a diffusion image modality, by name; {} when there is none or no image tokenizer."""
    if "image" not in tokenizers:
        return {}
    try:
        return load_span_codecs(model, tokenizer_folder, where=f"tokenizers {tokenizer_folder}")
    except ConfigError as err:
        raise GenerationError(str(err)) from None


# How the decoding steps run (mot.generate.decoder.CachedDecoder): auto = CUDA graphs on a GPU, eager on the CPU.
DECODING = ("auto", "eager", "graph", "compile")


class Session:
    """A model in eval mode on its device with everything needed to turn requests into generations."""

    def __init__(self, model: MoTTransformer, tokenizer_folder: Path | None, device: str = "auto",
                 precision: str = "auto", decoding: str = "auto"):
        self.tokenizers = load_tokenizers(tokenizer_folder, model.vocab)
        self.codecs = diffusion_codecs(model, self.tokenizers, tokenizer_folder)
        self.device = _device(device)
        dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and self.device.type == "cuda") \
            else torch.float32
        if decoding not in DECODING:
            raise GenerationError(f"decoding={decoding!r}: choose from {list(DECODING)}")
        if decoding == "auto":
            decoding = "graph" if self.device.type == "cuda" else "eager"
        if decoding in ("graph", "compile") and self.device.type != "cuda":
            raise GenerationError(f"--decoding {decoding} needs a CUDA device")
        if decoding == "compile" and dtype != torch.bfloat16:
            # The compiled step must be one graph: MoT's grouped matmul runs on CUDA in bf16 only.
            raise GenerationError("--decoding compile needs bf16 precision")
        self.decoding = decoding
        self._decoder: CachedDecoder | None = None  # the last one, reused (with its graphs) for the same shape
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.vocab = model.vocab

    def decoder(self, rows: int, slots: int) -> CachedDecoder:
        """A decoder of this shape in the session's mode (diffusion blocks run eager between graph steps)."""
        cached = self._decoder
        if cached is None or cached.cache.batch != rows or cached.cache.max_len != slots:
            self._decoder = None  # free the old cache first
            cached = self._decoder = CachedDecoder(self.model, rows, slots, compile=self.decoding == "compile",
                                                   cuda_graph=self.decoding == "graph")
        return cached

    @property
    def modalities(self) -> list[str]:
        return [r.name for r in self.vocab.ranges]

    def config(self, request: GenerationRequest) -> GenerationConfig:
        """The loop's settings; image and speech generation need a tokenizer to decode them."""
        image_tokens, clip = None, None
        if "image" in self.modalities and "image" in self.tokenizers:
            h, w = image_grid_of(self.tokenizers["image"])
            image_tokens = h * w
        if "image" in self.codecs:
            image_tokens, clip = self.codecs["image"].tokens_per_image, self.codecs["image"].bound
        speech_cap = request.speech_max_tokens if "speech" in self.modalities and "speech" in self.tokenizers else None
        return GenerationConfig(
            max_new_tokens=request.max_tokens, temperature=request.temperature, top_k=request.top_k,
            top_p=request.top_p, seed=request.seed, guidance_scale=request.guidance_scale,
            image_tokens=image_tokens, speech_max_tokens=speech_cap,
            usable_ids={name: tok.vocab_size for name, tok in self.tokenizers.items()},
            diffusion_steps=request.diffusion_steps, diffusion_eta=request.diffusion_eta, diffusion_clip=clip,
        )

    def prepare(self, request: GenerationRequest) -> tuple[list[int], list[torch.Tensor], GenerationConfig]:
        """(prompt ids, the prompt's clean image latents under diffusion, the loop's config), every setting
        checked: a `GenerationError` says which is wrong before any work."""
        if request.then not in THEN:
            raise GenerationError(f"then={request.then!r}: choose from {list(THEN)}")
        if request.samples <= 0:
            raise GenerationError(f"samples must be positive, got {request.samples}")
        if request.max_tokens <= 0:
            raise GenerationError(f"max tokens must be positive, got {request.max_tokens}")
        prompt = build_prompt(self.vocab, self.tokenizers, request.prompt, request.image, request.audio,
                              request.then)
        # A diffusion image modality holds the prompt's image as its clean latent tokens (placeholders in `prompt`).
        prompt, prompt_latents = latent_prompt(self.vocab, self.codecs, prompt)
        if len(prompt) + request.max_tokens > self.model.cfg.max_seq_len:
            raise GenerationError(f"the prompt ({len(prompt)} tokens) plus max tokens {request.max_tokens} exceeds "
                                  f"the model's max_seq_len {self.model.cfg.max_seq_len}")
        config = self.config(request)
        try:
            config.check()
        except ValueError as err:
            raise GenerationError(str(err)) from None
        return prompt, prompt_latents, config

    @torch.no_grad()
    def generate(self, request: GenerationRequest,
                 on_token: Callable[[int, int], None] | None = None) -> list[Generation]:
        """The request's samples (one batch); on_token(sample, id) sees every id as it is sampled."""
        prompt, prompt_latents, config = self.prepare(request)
        try:
            decoder = self.decoder(request.samples * (2 if config.guided else 1),
                                   cache_slots(self.model, [prompt] * request.samples, config))
            return generate(self.model, [prompt] * request.samples, config, decoder,
                            [prompt_latents] * request.samples if prompt_latents else None, on_token)
        except ValueError as err:
            raise GenerationError(str(err)) from None
