"""Batched interleaved generation: prefill the prompts, then one token per sample per step over a KV cache.

    results = generate(model, [prompt] * 4, GenerationConfig(max_new_tokens=300, image_tokens=64, seed=1))

Prompts are unified ids starting with <bod> (mot.generate.prompt builds them); shorter ones are
left-padded with invisible <pad> slots. Every step samples under the modality constraints
(mot.generate.constraints), so text, image and speech spans come out well formed.

Classifier-free guidance. Each sample gets a second, unconditional row in the same batch. It is
fed the very same tokens as its conditional row, but sees only its own <bod> and the open span:
when a span opens (<boi>, <bos>), every other slot of the row is hidden and its rotary positions
restart at 1, so it reads `<bod> <boi> codes so far`, a document that starts with an image. That is
the unconditional stream of Chameleon-style models (everything before the span dropped, the
model's own generated text included), and needs no condition dropout in training: image-first
documents are in the data. Inside image and speech spans the logits are mixed as
uncond + scale * (cond - uncond), computed as cond + (scale - 1) * (cond - uncond) so that scale 1
is exactly the conditional logits; elsewhere the conditional logits are used as they are.

Diffusion image spans (Transfusion setting: the image modality's objective is "diffusion"). When a
row's <boi> has been fed (sampled, or the prompt ends with it), its span is not sampled code by code:
the next forward is a block of n slots for the whole batch, the placeholder id in the rows that open a
span (their unconditional rows too, which restarted at the <boi> as above) and invisible <pad> slots in
the others, whose next-token logits stay as they were. The span's latents start as per-sample noise
(mot.generate.diffusion.span_generator) and every denoising pass rewrites the same slots
(bidirectional inside the span, the cache length unchanged); the conditional and unconditional
predictions mix like the logits. A last pass writes the clean latents at t = 0 and keeps them, so
later tokens attend to the clean image, as in training. The span's rotary positions continue from the
<boi> (n consecutive positions, as the trainer's LatentBatcher gives them); it counts as n tokens of the
budget; <eoi> is then forced. Rows opening a span at the same step share one block; a block costs
every other row n wasted, invisible slots, which `cache_slots` provisions.

A prompt may hold diffusion image spans too (captioning): each is <boi>, n placeholder ids, <eoi> in the ids,
and its clean latent tokens come beside them (`generate(..., prompt_latents=...)`;
mot.generate.prompt.latent_prompt makes both from VQGAN codes). The prefill feeds them at t = 0 with span ids
(KVCache.append), so a span is bidirectional inside and causal elsewhere, on n consecutive positions: a clean
image as the trainer's LatentBatcher lays it out. The unconditional rows get the same slots, hidden like the
rest of their prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mot.generate.constraints import IMAGE, ModalityConstraints, SpanState
from mot.generate.decoder import CachedDecoder
from mot.generate.diffusion import SpanSpec, denoise_in_cache, span_generator
from mot.generate.host import to_device
from mot.generate.sampling import SamplingConfig, sample
from mot.model.transformer import MoTTransformer


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256  # per sample, spans included (a span opens only if it can close within it)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    guidance_scale: float = 1.0  # classifier-free guidance inside image and speech spans; 1 = none
    guidance_stream: bool | None = None  # run the unconditional rows; None = only when guidance_scale != 1
    image_tokens: int | None = None  # codes per image (VQGAN h * w; latent tokens under diffusion); None = no images
    speech_max_tokens: int | None = None  # cap on one speech span's units; None = no speech
    usable_ids: dict[str, int] = field(default_factory=dict)  # per modality: local ids its tokenizer decodes
    # A diffusion image modality (its spans are denoised, not sampled code by code):
    diffusion_steps: int = 50  # denoising passes per image span
    diffusion_eta: float = 1.0  # ddpm_cosine schedule only: 1 ancestral DDPM, 0 deterministic DDIM
    diffusion_clip: float | None = None  # bound on the predicted clean latents: the codec's `bound`; None = none

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p).check()

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1 if self.guidance_stream is None else self.guidance_stream

    def check(self) -> GenerationConfig:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.diffusion_steps <= 0:
            raise ValueError(f"diffusion_steps must be positive, got {self.diffusion_steps}")
        if self.diffusion_eta < 0:
            raise ValueError(f"diffusion_eta must be >= 0, got {self.diffusion_eta}")
        self.sampling  # noqa: B018 (checks temperature, top_k, top_p)
        return self


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int]  # the generated ids, <eod> included when the sample ended the document
    finished: bool  # ended with <eod> (False: stopped at max_new_tokens)
    # Per diffusion image span, in order: its clean latent tokens (n, token_dim), CPU float32. The span's
    # ids in `tokens` are n placeholders (the modality's first id).
    latents: list[torch.Tensor] = field(default_factory=list)
    # Per diffusion image span of the prompt, in order: the clean latent tokens it was given (`prompt_latents`).
    prompt_latents: list[torch.Tensor] = field(default_factory=list)


class _Rows:
    """Host-side bookkeeping of the batch rows: next rotary position of each, where its <bod> sits."""

    def __init__(self, prompts: list[list[int]], rules: ModalityConstraints, guided: bool, pad: int):
        self.width, self.pad = max(len(p) for p in prompts), pad
        self.tokens, self.positions, self.visible, self.bod_slot, self.next_pos = [], [], [], [], []
        for uncond in (False, True) if guided else (False,):
            for prompt in prompts:
                self._add(prompt, rules, uncond)

    def _add(self, prompt: list[int], rules: ModalityConstraints, uncond: bool) -> None:
        lead = self.width - len(prompt)
        positions = [0] * lead + list(range(len(prompt)))
        visible = [False] * lead + [True] * len(prompt)
        next_pos = len(prompt)
        if uncond:  # sees its <bod> and, when the prompt ends inside a span, that span
            opens = [i for i, t in enumerate(prompt) if rules.opens_span(t)]
            span = opens[-1] if opens and rules.start(prompt, 1 << 30).in_span else len(prompt)
            visible = [False] * self.width
            visible[lead] = True
            for i in range(span, len(prompt)):
                visible[lead + i], positions[lead + i] = True, 1 + i - span
            next_pos = 1 + len(prompt) - span if span < len(prompt) else next_pos
        self.tokens.append([self.pad] * lead + list(prompt))
        self.positions.append(positions)
        self.visible.append(visible)
        self.bod_slot.append(lead)
        self.next_pos.append(next_pos)

    def feed(self, row: int, token: int, visible: bool, restart: bool = False) -> tuple[int, int, bool]:
        """(token, position, visible) of this step for one row; restart = the row's positions begin again at 1."""
        if restart:
            self.next_pos[row] = 1
        position = self.next_pos[row]
        self.next_pos[row] += 1
        return token, position, visible


def diffusion_spec(model: MoTTransformer, config: GenerationConfig) -> SpanSpec | None:
    """How image spans are denoised, when the image modality's objective is diffusion and images are on."""
    names = [r.name for r in model.vocab.ranges]
    if IMAGE not in names or config.image_tokens is None or not model.cfg.modalities[names.index(IMAGE)].is_diffusion:
        return None
    spec = SpanSpec.for_model(model, names.index(IMAGE), config.diffusion_steps, config.diffusion_eta,
                              config.diffusion_clip, config.guidance_scale)
    if config.image_tokens != spec.tokens:
        raise ValueError(f"image_tokens={config.image_tokens}, but an image span of the diffusion modality holds "
                         f"{spec.tokens} latent tokens ((latent_grid / patch_size) ** 2)")
    return spec


def cache_slots(model: MoTTransformer, prompts: list[list[int]], config: GenerationConfig) -> int:
    """KV cache slots a generation may use: the widest prompt, one per step, and n per diffusion block (at most
    one block for the prompts that end with <boi>, then one per span any sample can still fit)."""
    slots = max(len(p) for p in prompts) + config.max_new_tokens
    spec = diffusion_spec(model, config)
    if spec is not None:
        slots += spec.tokens * (1 + len(prompts) * (config.max_new_tokens // (spec.tokens + 2)))
    return slots


def _denoise_block(
    decoder: CachedDecoder,
    rows: _Rows,
    spec: SpanSpec,
    opening: list[int],
    n_samples: int,
    guided: bool,
    logits: torch.Tensor,
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoise the spans of the samples in `opening` (their <boi> just fed) in one block of the cache.

    Returns the next-token logits (B, V), those of every other row unchanged, and the clean spans (k, n, dim)."""
    device, n = decoder.device, spec.tokens
    span_rows = opening + ([n_samples + i for i in opening] if guided else [])
    positions = torch.zeros(len(rows.next_pos), n, dtype=torch.long)
    for r in span_rows:  # n consecutive positions after the <boi> (restarted in an unconditional row)
        positions[r] = torch.arange(rows.next_pos[r], rows.next_pos[r] + n)
        rows.next_pos[r] += n
    noise = torch.stack([torch.randn(n, spec.token_dim, generator=generators[i], device=device) for i in opening])
    as_rows = lambda ids: torch.tensor(ids, dtype=torch.long, device=device)
    block_logits, clean = denoise_in_cache(decoder, spec, positions.to(device), as_rows(opening), noise,
                                           [generators[i] for i in opening],
                                           as_rows(span_rows[len(opening):]) if guided else None)
    in_block = torch.zeros(logits.shape[0], 1, dtype=torch.bool, device=device)
    in_block[as_rows(span_rows)] = True
    return torch.where(in_block, block_logits, logits), clean


def _prompt_spans(prompts: list[list[int]], spec: SpanSpec, vocab) -> list[list[tuple[int, int]]]:
    """Per prompt, the (start, stop) of each of its image spans: n placeholders between <boi> and <eoi>."""
    image, boi, eoi = vocab.ranges[spec.modality], vocab.special_id("<boi>"), vocab.special_id("<eoi>")
    found = []
    for i, prompt in enumerate(prompts):
        inside = [image.start <= t < image.stop for t in prompt]
        spans = []
        for a, here in enumerate(inside):
            if not here or (a > 0 and inside[a - 1]):
                continue
            b = a
            while b < len(prompt) and inside[b]:
                b += 1
            if (b - a != spec.tokens or any(t != spec.placeholder for t in prompt[a:b]) or a == 0
                    or prompt[a - 1] != boi or b == len(prompt) or prompt[b] != eoi):
                raise ValueError(f"prompt {i}: an image span of the diffusion modality must be <boi>, {spec.tokens} "
                                 f"placeholder ids ({spec.placeholder}) and <eoi> (mot.generate.prompt.latent_prompt "
                                 f"makes them); found {b - a} image ids at {a}")
            spans.append((a, b))
        found.append(spans)
    return found


def _prompt_inputs(
    rows: _Rows,
    prompts: list[list[int]],
    prompt_latents: list[list[torch.Tensor]] | None,
    spec: SpanSpec | None,
    vocab,
    device: torch.device,
) -> tuple[dict[int, torch.Tensor] | None, torch.Tensor | None]:
    """The prefill's clean latents and span ids (rows, width) for the prompts' diffusion image spans, or
    (None, None) when there are none. Every row gets its prompt's latents: the unconditional rows hold the same
    slots, hidden (a prompt image lies before any span they could open)."""
    if spec is None:
        if prompt_latents is not None and any(prompt_latents):
            raise ValueError("prompt_latents given, but the model has no diffusion image modality (or image_tokens "
                             "is None)")
        return None, None
    spans = _prompt_spans(prompts, spec, vocab)
    prompt_latents = prompt_latents if prompt_latents is not None else [[] for _ in prompts]
    if len(prompt_latents) != len(prompts):
        raise ValueError(f"prompt_latents holds {len(prompt_latents)} lists for {len(prompts)} prompts")
    for i, (found, given) in enumerate(zip(spans, prompt_latents, strict=True)):
        if len(found) != len(given):
            raise ValueError(f"prompt {i} holds {len(found)} image spans of the diffusion modality but "
                             f"prompt_latents gives {len(given)} (their clean latent tokens, in order)")
        for z in given:
            if tuple(z.shape) != (spec.tokens, spec.token_dim):
                raise ValueError(f"prompt {i}: prompt latents of shape {tuple(z.shape)}; an image span takes "
                                 f"({spec.tokens}, {spec.token_dim})")
    if not any(spans):
        return None, None
    span_ids = torch.full((len(rows.tokens), rows.width), -1, dtype=torch.long)
    latents = []
    for r in range(len(rows.tokens)):
        i = r % len(prompts)
        lead = rows.width - len(prompts[i])
        for k, (a, b) in enumerate(spans[i]):
            span_ids[r, lead + a : lead + b] = k
        latents += prompt_latents[i]
    return {spec.modality: torch.cat(latents).to(device)}, span_ids.to(device)


def _through_span(rules: ModalityConstraints, state: SpanState, spec: SpanSpec) -> SpanState:
    """The state after a denoised span: its n placeholders spent from the budget, <eoi> due."""
    for _ in range(spec.tokens):
        state = rules.advance(state, spec.placeholder)
    return state


@torch.no_grad()
def generate(
    model: MoTTransformer,
    prompts: list[list[int]],
    config: GenerationConfig,
    decoder: CachedDecoder | None = None,
    prompt_latents: list[list[torch.Tensor]] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[Generation]:
    """Continue every prompt (unified ids) by up to config.max_new_tokens tokens, all in one batch.

    prompt_latents: under a diffusion image modality, per prompt the clean latent tokens (n, token_dim) of each
    of its image spans, in order (each span in the ids: <boi>, n placeholder ids, <eoi>; see
    mot.generate.prompt.latent_prompt). on_token(sample, id): called with every sampled id as it is chosen
    (streaming; a diffusion span's placeholders are not reported, its picture comes with the result)."""
    config.check()
    if not prompts or any(not p for p in prompts):
        raise ValueError("generate needs at least one prompt, each with at least one token (<bod>)")
    rules = ModalityConstraints(model.vocab, config.image_tokens, config.speech_max_tokens, config.usable_ids)
    spec = diffusion_spec(model, config)
    states = [rules.start(p, config.max_new_tokens) for p in prompts]
    rows = _Rows(prompts, rules, config.guided, rules.id["<pad>"])
    n, batch = len(prompts), len(rows.tokens)
    if rows.width + config.max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"the prompts ({rows.width} tokens) plus max_new_tokens ({config.max_new_tokens}) exceed "
                         f"model.max_seq_len ({model.cfg.max_seq_len})")
    max_len = cache_slots(model, prompts, config)
    if decoder is None:
        decoder = CachedDecoder(model, batch, max_len)
    elif decoder.cache.batch != batch or decoder.cache.max_len < max_len:
        raise ValueError(f"decoder holds {decoder.cache.batch} rows x {decoder.cache.max_len} slots; this "
                         f"generation needs {batch} x {max_len}")
    device = decoder.device
    as_tensor = lambda values, dtype=torch.long: to_device(values, device, dtype)
    prefill_latents, span_ids = _prompt_inputs(rows, prompts, prompt_latents, spec, model.vocab, device)
    logits = decoder.prefill(as_tensor(rows.tokens), as_tensor(rows.positions), as_tensor(rows.visible, torch.bool),
                             prefill_latents, span_ids, decoder.tower_counts([t for row in rows.tokens for t in row]))

    generator = torch.Generator(device=device).manual_seed(config.seed)
    span_noise = [span_generator(config.seed, i, device) for i in range(n)] if spec is not None else []
    sampling, scale = config.sampling, config.guidance_scale
    out: list[list[int]] = [[] for _ in prompts]
    latents: list[list[torch.Tensor]] = [[] for _ in prompts]
    for _ in range(config.max_new_tokens):
        opening = [i for i, s in enumerate(states) if s.live and s.kind == IMAGE and s.count == 0] if spec else []
        if opening:  # <boi> fed: denoise the spans, then <eoi> is the only choice
            logits, clean = _denoise_block(decoder, rows, spec, opening, n, config.guided, logits, span_noise)
            for i, x in zip(opening, clean, strict=True):
                out[i] += [spec.placeholder] * spec.tokens
                latents[i].append(x.float().cpu())
                states[i] = _through_span(rules, states[i], spec)
        cond = logits[:n]
        if config.guided:
            in_span = as_tensor([s.in_span for s in states], torch.bool)[:, None]
            cond = torch.where(in_span, cond + (scale - 1) * (cond - logits[n:]), cond)
        allowed = rules.allowed(states, device)
        chosen = sample(cond.masked_fill(~allowed, float("-inf")), sampling, generator).tolist()
        feed: list[tuple[int, int, bool]] = [(rows.pad, 0, False)] * batch  # (token, position, visible) per row
        for i, token in enumerate(chosen):
            before = states[i]
            if not before.live:
                feed[i] = rows.feed(i, rows.pad, False)
                if config.guided:
                    feed[n + i] = rows.feed(n + i, rows.pad, False)
                continue
            out[i].append(token)
            if on_token is not None:
                on_token(i, token)
            states[i] = rules.advance(before, token)
            feed[i] = rows.feed(i, token, True)
            if config.guided:
                opens = rules.opens_span(token)
                if opens:  # the unconditional row starts over: <bod> <boi>
                    decoder.cache.hide(n + i, rows.bod_slot[n + i] + 1, decoder.cache.length)
                feed[n + i] = rows.feed(n + i, token, before.in_span or states[i].in_span, restart=opens)
        if not any(s.live for s in states):
            break
        tokens, positions, visible = zip(*feed, strict=True)
        logits = decoder.step(tokens, positions, visible)
    given = prompt_latents if prefill_latents is not None else [[] for _ in prompts]
    return [Generation(list(p), o, s.kind == "done", z, [x.float().cpu() for x in g])
            for p, o, s, z, g in zip(prompts, out, states, latents, given, strict=True)]


def span_states(rules: ModalityConstraints, generation: Generation, budget: int) -> list[SpanState]:
    """The state before every generated token, replayed under `budget` (for tests and inspection)."""
    state = rules.start(generation.prompt, budget)
    states = []
    for token in generation.tokens:
        states.append(state)
        state = rules.advance(state, token)
    return states
