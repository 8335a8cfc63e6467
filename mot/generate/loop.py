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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mot.generate.constraints import ModalityConstraints, SpanState
from mot.generate.sampling import SamplingConfig, sample
from mot.model.kv_cache import KVCache
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
    image_tokens: int | None = None  # codes per image (VQGAN h * w); None = no images
    speech_max_tokens: int | None = None  # cap on one speech span's units; None = no speech
    usable_ids: dict[str, int] = field(default_factory=dict)  # per modality: local ids its tokenizer decodes

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
        self.sampling  # noqa: B018 (checks temperature, top_k, top_p)
        return self


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int]  # the generated ids, <eod> included when the sample ended the document
    finished: bool  # ended with <eod> (False: stopped at max_new_tokens)


class CachedDecoder:
    """The model over one KV cache: `prefill`, then `step` one token per row; eager or compiled.

    compile=True compiles the single-token step with static shapes (mode="reduce-overhead": CUDA graphs
    on a GPU). A decoder, and its compiled graphs, can be reused for generations of the same shape.
    """

    def __init__(self, model: MoTTransformer, rows: int, max_len: int, compile: bool = False):
        self.model = model
        self.cache = KVCache.for_model(model, rows, max_len)
        device = model.embed.weight.device
        self.modality_table = model.vocab.modality_of(torch.arange(model.vocab.size, device=device))
        self.compiled = compile
        self._step = model.decode_step
        if compile:
            for tensor in self.cache.tensors():  # updated in place by the graph: fixed addresses
                torch._dynamo.mark_static_address(tensor)
            self._step = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True)

    @property
    def device(self) -> torch.device:
        return self.cache.visible.device

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """(rows, P) prompt -> float32 logits (rows, V) of the next token. Empties the cache first."""
        self.cache.reset()
        logits = self.model.forward_cached(tokens, self.modality_table[tokens], positions, self.cache, visible,
                                           last_only=True)
        return logits[:, -1].float()

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """(rows,) one token per row -> float32 logits (rows, V) of the next one."""
        tokens, positions, visible = tokens[:, None], positions[:, None], visible[:, None]
        modality = self.modality_table[tokens]
        if not self.compiled:  # eager: attend over the filled slots only
            logits = self.model.forward_cached(tokens, modality, positions, self.cache, visible)
            return logits[:, -1].float()
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"KV cache full: {self.cache.max_len} slots")
        slot = torch.tensor(self.cache.length, device=self.device)
        torch.compiler.cudagraph_mark_step_begin()
        logits = self._step(tokens, modality, positions, self.cache, slot, visible)
        self.cache.length += 1
        return logits[:, -1].float()  # a copy: the graph's output buffer is overwritten by the next replay


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


@torch.no_grad()
def generate(
    model: MoTTransformer,
    prompts: list[list[int]],
    config: GenerationConfig,
    decoder: CachedDecoder | None = None,
) -> list[Generation]:
    """Continue every prompt (unified ids) by up to config.max_new_tokens tokens, all in one batch."""
    config.check()
    if not prompts or any(not p for p in prompts):
        raise ValueError("generate needs at least one prompt, each with at least one token (<bod>)")
    rules = ModalityConstraints(model.vocab, config.image_tokens, config.speech_max_tokens, config.usable_ids)
    states = [rules.start(p, config.max_new_tokens) for p in prompts]
    rows = _Rows(prompts, rules, config.guided, rules.id["<pad>"])
    n, batch = len(prompts), len(rows.tokens)
    max_len = rows.width + config.max_new_tokens
    if decoder is None:
        decoder = CachedDecoder(model, batch, max_len)
    elif decoder.cache.batch != batch or decoder.cache.max_len < max_len:
        raise ValueError(f"decoder holds {decoder.cache.batch} rows x {decoder.cache.max_len} slots; this "
                         f"generation needs {batch} x {max_len}")
    device = decoder.device
    as_tensor = lambda values, dtype=torch.long: torch.tensor(values, dtype=dtype, device=device)
    logits = decoder.prefill(as_tensor(rows.tokens), as_tensor(rows.positions), as_tensor(rows.visible, torch.bool))

    generator = torch.Generator(device=device).manual_seed(config.seed)
    sampling, scale = config.sampling, config.guidance_scale
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(config.max_new_tokens):
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
        logits = decoder.step(as_tensor(tokens), as_tensor(positions), as_tensor(visible, torch.bool))
    return [Generation(list(p), o, s.kind == "done") for p, o, s in zip(prompts, out, states, strict=True)]


def span_states(rules: ModalityConstraints, generation: Generation, budget: int) -> list[SpanState]:
    """The state before every generated token, replayed under `budget` (for tests and inspection)."""
    state = rules.start(generation.prompt, budget)
    states = []
    for token in generation.tokens:
        states.append(state)
        state = rules.advance(state, token)
    return states
