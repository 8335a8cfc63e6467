"""Generation: the KV cache computes what the full forward computes; constrained, guided, seeded sampling."""

from __future__ import annotations

import pytest
import torch

from mot.data.synthetic import random_layout, tokens_for_layout
from mot.generate import GenerationConfig, ModalityConstraints, generate, split_spans
from mot.generate.decoder import CachedDecoder
from mot.generate.loop import span_states
from mot.model import ModelInputs, MoTTransformer
from mot.model.kv_cache import KVCache
from tests.conftest import randomize_norms, tiny_config

IMAGE_TOKENS, SPEECH_CAP = 6, 5


def _model(generator, dtype=torch.float64, **overrides) -> MoTTransformer:
    torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=generator)))  # init draws from the global RNG
    model = MoTTransformer(tiny_config(**overrides)).to(dtype).eval()
    randomize_norms(model, generator)
    return model


# ---------------------------------------------------------------- the cache


@pytest.mark.parametrize("untie", [["attn", "ffn", "norm"], []], ids=["mot", "dense"])
@pytest.mark.parametrize("placement,qk_norm", [("pre", False), ("chameleon", True)])
def test_cached_decoding_equals_full_recompute_at_every_step(untie, placement, qk_norm, generator):
    model = _model(generator, untie=untie, norm_placement=placement, qk_norm=qk_norm)
    tokens = tokens_for_layout(random_layout(2, 32, [0, 1, 2], 6, generator), model.vocab, generator)
    prefill = 12
    for static in (False, True):
        cache = KVCache.for_model(model, 2, 40)
        with torch.no_grad():
            model.forward_cached(ModelInputs(tokens[:, :prefill].contiguous()), cache)
            for t in range(prefill, tokens.shape[1]):
                full = model(ModelInputs(tokens[:, : t + 1].contiguous())).logits[:, -1]  # recomputed from scratch
                new, ones = tokens[:, t : t + 1].contiguous(), torch.ones(2, 1, dtype=torch.bool)
                if static:  # the compiled path: fixed shapes, written at a slot tensor
                    slot = torch.tensor(cache.length)
                    cached = model.decode_step(new, model.vocab.modality_of(new), slot.expand(2, 1), cache, slot, ones)
                    cache.length += 1
                else:
                    cached = model.forward_cached(ModelInputs(new), cache).logits
                torch.testing.assert_close(cached[:, -1], full, rtol=0, atol=1e-12)


def test_prefill_logits_equal_the_training_forward(generator):
    model = _model(generator, dtype=torch.float32)
    tokens = tokens_for_layout(random_layout(2, 30, [0, 1, 2], 5, generator), model.vocab, generator)
    with torch.no_grad():
        cached = model.forward_cached(ModelInputs(tokens), KVCache.for_model(model, 2, 30)).logits
        torch.testing.assert_close(cached, model(ModelInputs(tokens)).logits, rtol=1e-5, atol=1e-5)


def test_left_padding_and_hidden_slots_change_nothing_visible(generator):
    """A row behind invisible pads, with its own positions, computes what the row alone computes."""
    model = _model(generator)
    tokens = tokens_for_layout(random_layout(1, 10, [0, 1, 2], 4, generator), model.vocab, generator)
    pad = model.vocab.special_id("<pad>")
    padded = torch.cat([torch.full((1, 5), pad), tokens], 1)
    positions = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.arange(10)[None]], 1)
    visible = positions.new_ones(1, 15, dtype=torch.bool)
    visible[:, :5] = False
    with torch.no_grad():
        inputs = ModelInputs(padded, positions=positions)
        got = model.forward_cached(inputs, KVCache.for_model(model, 1, 15), visible=visible).logits[:, 5:]
        torch.testing.assert_close(got, model(ModelInputs(tokens)).logits, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- constraints


class BiasedDecoder(CachedDecoder):
    """Random weights rarely open spans: push <boi>/<bos> up and <eod> down so every test sees spans."""

    def __init__(self, model, rows, max_len, bias: dict[int, float]):
        super().__init__(model, rows, max_len)
        self.bias = torch.zeros(model.vocab.size)
        for token, value in bias.items():
            self.bias[token] = value
        self.logits: list[torch.Tensor] = []

    def prefill(self, *args):
        self.logits.append(super().prefill(*args) + self.bias)
        return self.logits[-1]

    def step(self, *args):
        self.logits.append(super().step(*args) + self.bias)
        return self.logits[-1]


def _config(**overrides) -> GenerationConfig:
    base = dict(max_new_tokens=48, temperature=1.5, seed=0, image_tokens=IMAGE_TOKENS, speech_max_tokens=SPEECH_CAP)
    return GenerationConfig(**{**base, **overrides})


def _biased(model, config, n_samples, prompt_len):
    v = model.vocab
    rows = n_samples * (2 if config.guided else 1)
    bias = {v.special_id("<boi>"): 4.0, v.special_id("<bos>"): 4.0, v.special_id("<eod>"): -2.0}
    return BiasedDecoder(model, rows, prompt_len + config.max_new_tokens, bias)


def test_spans_hold_only_their_modality_and_the_right_count(generator):
    model = _model(generator, dtype=torch.float32)
    v = model.vocab
    config = _config(max_new_tokens=60)
    prompt = [v.special_id("<bod>"), v["text"].start + 3, v["text"].start + 7]
    results = generate(model, [prompt] * 6, config, _biased(model, config, 6, len(prompt)))
    rules = ModalityConstraints(v, IMAGE_TOKENS, SPEECH_CAP)
    seen = {"text": 0, "image": 0, "speech": 0}
    for result in results:
        assert len(result.tokens) <= config.max_new_tokens
        span_states(rules, result, config.max_new_tokens)  # every token was allowed where it stands
        spans = split_spans(result.tokens, v)
        for span in spans:
            seen[span.kind] += 1
            assert span.closed, "a generated span was left open"
            if span.kind == "image":
                assert len(span.ids) == IMAGE_TOKENS
            if span.kind == "speech":
                assert 1 <= len(span.ids) <= SPEECH_CAP
        # Raw ids: text positions never carry a code or a unit; spans only their own.
        kinds = [s.kind for s in span_states(rules, result, config.max_new_tokens)]
        for kind, token in zip(kinds, result.tokens, strict=True):
            if kind == "text":
                assert token < v["text"].stop or token >= v.special_start
            if kind == "image":
                assert v["image"].start <= token < v["image"].stop or token == v.special_id("<eoi>")
            if kind == "speech":
                assert v["speech"].start <= token < v["speech"].stop or token == v.special_id("<eos>")
    assert min(seen.values()) > 0, f"the test should exercise every kind of span: {seen}"


def test_prompt_ending_with_boi_gets_exactly_one_image_then_eoi(generator):
    model = _model(generator, dtype=torch.float32)
    v = model.vocab
    prompt = [v.special_id("<bod>"), v["text"].start + 1, v.special_id("<boi>")]
    result = generate(model, [prompt] * 2, _config(max_new_tokens=IMAGE_TOKENS + 1))[0]
    assert all(v["image"].start <= t < v["image"].stop for t in result.tokens[:IMAGE_TOKENS])
    assert result.tokens[IMAGE_TOKENS] == v.special_id("<eoi>")


def test_no_span_opens_that_the_budget_cannot_close(generator):
    v = _model(generator).vocab
    rules = ModalityConstraints(v, IMAGE_TOKENS, SPEECH_CAP)
    boi, bos, eos = v.special_id("<boi>"), v.special_id("<bos>"), v.special_id("<eos>")
    text = rules.start([v.special_id("<bod>")], IMAGE_TOKENS + 1)
    allowed = rules.allowed([text])[0]
    assert not allowed[boi] and allowed[bos] and allowed[v["text"].start]
    assert rules.allowed([rules.start([v.special_id("<bod>")], 2)])[0][bos].item() is False
    # Speech: at least one unit, <eos> forced at the cap.
    state = rules.advance(text, bos)
    assert not rules.allowed([state])[0][eos]
    for _ in range(SPEECH_CAP):
        state = rules.advance(state, v["speech"].start)
    assert rules.allowed([state])[0].nonzero().flatten().tolist() == [eos]
    with pytest.raises(ValueError, match="not allowed"):
        rules.advance(state, v["speech"].start)


def test_usable_ids_limit_what_is_sampled(generator):
    v = _model(generator).vocab
    rules = ModalityConstraints(v, IMAGE_TOKENS, None, usable={"text": 10})
    allowed = rules.allowed([rules.start([v.special_id("<bod>")], 100)])[0]
    assert allowed[v["text"].start : v["text"].start + 10].all() and not allowed[v["text"].start + 10 :
                                                                                   v["text"].stop].any()
    assert not allowed[v.special_id("<bos>")], "speech is off: no <bos>"


# ---------------------------------------------------------------- guidance and seeds


def test_guidance_scale_one_equals_plain_conditional_sampling(generator):
    model = _model(generator, dtype=torch.float32)
    v = model.vocab
    prompt = [v.special_id("<bod>"), v["text"].start + 5, v["text"].start + 9]
    plain = _config(max_new_tokens=40, guidance_scale=1.0)
    streams = _config(max_new_tokens=40, guidance_scale=1.0, guidance_stream=True)
    a = generate(model, [prompt] * 3, plain, _biased(model, plain, 3, len(prompt)))
    b = generate(model, [prompt] * 3, streams, _biased(model, streams, 3, len(prompt)))
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert any(s.kind == "image" for r in a for s in split_spans(r.tokens, v)), "no image span was guided"
    # Random weights barely condition on the prompt: a large scale makes the mix visible.
    strong = _config(max_new_tokens=40, guidance_scale=30.0)
    guided = generate(model, [prompt] * 3, strong, _biased(model, strong, 3, len(prompt)))
    assert [r.tokens for r in guided] != [r.tokens for r in a]


def test_unconditional_row_reads_bod_and_the_open_span_only(generator):
    """Inside a span, the second row's logits are those of the document `<bod> <boi> codes so far`."""
    model = _model(generator)
    v = model.vocab
    prompt = [v.special_id("<bod>"), v["text"].start + 2, v["text"].start + 4, v["speech"].start + 1]
    config = _config(max_new_tokens=30, guidance_scale=2.0)
    decoder = _biased(model, config, 1, len(prompt))
    result = generate(model, [prompt], config, decoder)[0]
    rules = ModalityConstraints(v, IMAGE_TOKENS, SPEECH_CAP)
    states = span_states(rules, result, config.max_new_tokens)
    checked = 0
    with torch.no_grad():
        for k, state in enumerate(states):
            if not state.in_span:
                continue
            opened = max(i for i in range(k) if rules.opens_span(result.tokens[i]))
            document = torch.tensor([[v.special_id("<bod>"), *result.tokens[opened:k]]])
            expected = model(ModelInputs(document)).logits[0, -1].float() + decoder.bias  # decoders hand out float32
            torch.testing.assert_close(decoder.logits[k][1], expected, rtol=0, atol=1e-6)
            checked += 1
    assert checked >= IMAGE_TOKENS, "no span was generated"


def test_a_seed_reproduces_the_samples_and_another_seed_does_not(generator):
    model = _model(generator, dtype=torch.float32)
    prompt = [model.vocab.special_id("<bod>")]
    runs = [generate(model, [prompt] * 2, _config(seed=seed, guidance_scale=2.0)) for seed in (7, 7, 8)]
    tokens = [[r.tokens for r in run] for run in runs]
    assert tokens[0] == tokens[1]
    assert tokens[0] != tokens[2]
    assert tokens[0][0] != tokens[0][1], "the samples of one batch should differ"


def test_bad_requests_say_what_is_wrong(generator):
    model = _model(generator)
    v = model.vocab
    with pytest.raises(ValueError, match="needs 7 more tokens"):
        generate(model, [[v.special_id("<bod>"), v.special_id("<boi>")]], _config(max_new_tokens=3))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[v.special_id("<bod>")]], _config(max_new_tokens=model.cfg.max_seq_len))
    with pytest.raises(ValueError, match="no image modality"):
        ModalityConstraints(MoTTransformer(tiny_config(modalities=tiny_config().modalities[:1])).vocab, 4)


def test_cuda_graph_decoding_needs_a_gpu_and_excludes_compile(generator):
    model = _model(generator, dtype=torch.float32)
    with pytest.raises(ValueError, match="CUDA device"):
        CachedDecoder(model, 2, 16, cuda_graph=True)
    with pytest.raises(ValueError, match="not both"):
        CachedDecoder(model, 2, 16, compile=True, cuda_graph=True)


def test_session_decoding_modes_are_checked_before_any_work(generator):
    from mot.generate.prompt import GenerationError
    from mot.generate.session import Session

    model = _model(generator, dtype=torch.float32)
    assert Session(model, None, device="cpu").decoding == "eager"  # auto: CUDA graphs only on a GPU
    for mode in ("graph", "compile"):
        with pytest.raises(GenerationError, match=f"--decoding {mode} needs a CUDA device"):
            Session(model, None, device="cpu", decoding=mode)
    with pytest.raises(GenerationError, match="choose from"):
        Session(model, None, device="cpu", decoding="fast")
