"""Diffusion image spans inside the KV-cached generation loop (Transfusion setting): the cached sampler computes
what the full-recompute oracle computes, leaves the other rows alone, a prompt image (captioning) is read as the
trainer reads a clean image, and `mot generate` draws the images."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mot.config import ModalityConfig
from mot.generate import GenerationConfig, ModalityConstraints, generate
from mot.generate.decoder import CachedDecoder
from mot.generate.diffusion import load_span_codecs, sample_span_reference, span_generator
from mot.generate.loop import cache_slots, span_states
from mot.model import ModelInputs, MoTTransformer
from mot.model.kernels import Kernels
from mot.model.masks import mixed_mask
from tests.conftest import randomize_norms
from tests.test_generate import BiasedDecoder  # biases the logits (to force <boi>), keeps all it hands out
from tests.test_generate_cli import DEMO_MODALITIES, _media, _mot, _run_folder
from tests.test_transfusion import diffusion_config

N = 4  # latent tokens per image: a 4x4 latent grid in 2x2 patches
IMAGE = 1  # the image modality's index


def _model(generator, untie=("attn", "ffn", "norm"), schedule="ddpm_cosine", dtype=torch.float64) -> MoTTransformer:
    torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=generator)))
    model = MoTTransformer(diffusion_config(patch_size=2, schedule=schedule, untie=list(untie))).to(dtype).eval()
    randomize_norms(model, generator)
    with torch.no_grad():  # the read-out starts at zero: every prediction would be 0
        for p in model.latent_io.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def _config(**overrides) -> GenerationConfig:
    base = dict(max_new_tokens=N + 5, temperature=0.0, image_tokens=N, diffusion_steps=4, diffusion_clip=2.5,
                seed=5)
    return GenerationConfig(**{**base, **overrides})


def _decoder(model, prompts, config, bias=None) -> BiasedDecoder:
    rows = len(prompts) * (2 if config.guided else 1)
    return BiasedDecoder(model, rows, cache_slots(model, prompts, config), bias or {})


def _reference(model, prefix, config, row) -> torch.Tensor:
    """The oracle's span after `prefix`, from the noise stream the loop gives sample `row`."""
    stream = span_generator(config.seed, row)
    noise = torch.randn(N, 16, generator=stream)
    return sample_span_reference(model, prefix, IMAGE, config.diffusion_steps, noise, config.guidance_scale,
                                 config.diffusion_clip, config.diffusion_eta, stream)


def _prefix_of_span(result, vocab) -> list[int]:
    """The prompt and the tokens up to the first generated span's <boi> (the whole prompt if it ends in one)."""
    boi = vocab.special_id("<boi>")
    if result.prompt[-1] == boi:
        return result.prompt
    return result.prompt + result.tokens[: result.tokens.index(boi) + 1]


# ---------------------------------------------------------------- the cached sampler equals the oracle


@pytest.mark.parametrize("untie", [("attn", "ffn", "norm"), ()], ids=["mot", "dense"])
@pytest.mark.parametrize("schedule,eta", [("ddpm_cosine", 0.0), ("ddpm_cosine", 1.0), ("flow", 1.0)],
                         ids=["ddim", "ddpm", "flow"])
@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["plain", "guided"])
def test_cached_spans_equal_the_full_recompute_sampler(untie, schedule, eta, scale, generator):
    model = _model(generator, untie, schedule)
    v = model.vocab
    prompts = [[v.special_id("<bod>"), v["text"].start + 3, v["text"].start + 8, v.special_id("<boi>")],
               [v.special_id("<bod>"), v["text"].start + 1, v.special_id("<boi>")]]  # left-padded
    config = _config(guidance_scale=scale, diffusion_eta=eta)
    results = generate(model, prompts, config)
    for row, result in enumerate(results):
        assert result.tokens[:N + 1] == [v["image"].start] * N + [v.special_id("<eoi>")]
        assert len(result.latents) == 1 and result.latents[0].shape == (N, 16)
        assert result.latents[0].dtype == torch.float32 and result.latents[0].device.type == "cpu"
        torch.testing.assert_close(result.latents[0], _reference(model, result.prompt, config, row),
                                   rtol=0, atol=1e-5)
    assert not torch.allclose(results[0].latents[0], results[1].latents[0]), "each sample has its own noise"


@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["plain", "guided"])
def test_spans_opened_at_different_steps_leave_the_other_rows_alone(scale, generator):
    """Row 0 closes its prompt's speech span and opens its image span two steps after row 1: each block gives the
    other row invisible pads. Row 0 comes out as it does alone; each span is the oracle's (whose unconditional
    stream is <bod> <boi> span: the speech span is hidden again); after each span the next-token logits are those
    of a full forward over the clean latents at t = 0 under the bidirectional span mask."""
    model = _model(generator)
    v = model.vocab
    boi, eoi, bod, eos = (v.special_id(s) for s in ("<boi>", "<eoi>", "<bod>", "<eos>"))
    prompts = [[bod, v["text"].start + 2, v.special_id("<bos>"), v["speech"].start + 1],
               [bod, v["text"].start + 5, boi]]
    config = _config(guidance_scale=scale, max_new_tokens=N + 6, speech_max_tokens=3)  # one image per row
    bias = {boi: 50.0, eos: 50.0, v.special_id("<eod>"): -50.0}
    decoder = _decoder(model, prompts, config, bias)
    results = generate(model, prompts, config, decoder)
    alone = generate(model, prompts[:1], config, _decoder(model, prompts[:1], config, bias))[0]
    assert results[0].tokens[:2] == [eos, boi] and results[0].tokens == alone.tokens
    torch.testing.assert_close(results[0].latents[0], alone.latents[0], rtol=0, atol=1e-6)

    rules = ModalityConstraints(v, N, 3)
    with torch.no_grad():
        for row, result in enumerate(results):
            span_states(rules, result, config.max_new_tokens)  # every token allowed where it stands
            assert len(result.latents) == 1
            prefix = _prefix_of_span(result, v)
            torch.testing.assert_close(result.latents[0], _reference(model, prefix, config, row), rtol=0, atol=1e-5)
            # Logits after the <eoi>: handed out by the step that fed it (one step per sampled token).
            end = result.tokens.index(eoi)
            ids = prefix + [v["image"].start] * N + [eoi]
            span = torch.full((1, len(ids)), -1)
            span[0, len(prefix) : len(prefix) + N] = 0
            tokens = torch.tensor([ids])
            logits = model(ModelInputs(tokens, attn_mask=mixed_mask(torch.zeros_like(tokens), span),
                                       latents={IMAGE: result.latents[0]}, timesteps={IMAGE: torch.zeros(N)})).logits
            torch.testing.assert_close(decoder.logits[end - N + 1][row], logits[0, -1].float() + decoder.bias,
                                       rtol=0, atol=1e-6)


def test_a_span_opens_only_if_it_can_close_and_counts_its_tokens(generator):
    model = _model(generator)
    v = model.vocab
    prompt = [v.special_id("<bod>"), v["text"].start + 2]
    bias = {v.special_id("<boi>"): 50.0, v.special_id("<eod>"): -50.0}
    # N + 1 tokens: <boi>, N latents and <eoi> do not fit, so no span opens.
    short = _config(max_new_tokens=N + 1)
    result = generate(model, [prompt], short, _decoder(model, [prompt], short, bias))[0]
    assert v.special_id("<boi>") not in result.tokens and not result.latents and len(result.tokens) == N + 1
    # N + 2 fit exactly: <boi> N latents <eoi>.
    exact = _config(max_new_tokens=N + 2)
    result = generate(model, [prompt], exact, _decoder(model, [prompt], exact, bias))[0]
    assert result.tokens == [v.special_id("<boi>"), *[v["image"].start] * N, v.special_id("<eoi>")]
    assert len(result.latents) == 1


def test_a_seed_reproduces_the_latents_and_another_does_not(generator):
    model = _model(generator, dtype=torch.float32)
    v = model.vocab
    prompt = [v.special_id("<bod>"), v.special_id("<boi>")]
    runs = [generate(model, [prompt] * 2, _config(seed=seed, temperature=1.0)) for seed in (3, 3, 4)]
    assert torch.equal(runs[0][0].latents[0], runs[1][0].latents[0])
    assert not torch.allclose(runs[0][0].latents[0], runs[2][0].latents[0])


def test_bad_diffusion_requests_say_what_is_wrong(generator):
    model = _model(generator)
    v = model.vocab
    with pytest.raises(ValueError, match="latent tokens"):
        generate(model, [[v.special_id("<bod>")]], _config(image_tokens=16))
    boi, eoi, bod = v.special_id("<boi>"), v.special_id("<eoi>"), v.special_id("<bod>")
    with pytest.raises(ValueError, match="placeholder ids"):  # an unfinished span
        generate(model, [[bod, boi, v["image"].start]], _config())
    with pytest.raises(ValueError, match="placeholder ids"):  # codes, not placeholders
        generate(model, [[bod, boi, *[v["image"].start + 1] * N, eoi]], _config(), prompt_latents=[[_latents(1)]])
    with pytest.raises(ValueError, match="prompt_latents gives 0"):
        generate(model, [[bod, boi, *[v["image"].start] * N, eoi]], _config())
    with pytest.raises(ValueError, match="shape"):
        generate(model, [[bod, boi, *[v["image"].start] * N, eoi]], _config(),
                 prompt_latents=[[torch.zeros(N, 3)]])
    with pytest.raises(ValueError, match="diffusion_steps"):
        generate(model, [[v.special_id("<bod>")]], _config(diffusion_steps=0))


def test_compiled_decode_step_runs_around_the_eager_diffusion_block(generator):
    """The diffusion block runs eager between compiled steps; the step graph is traced once and never again."""
    torch._dynamo.reset()
    model = _model(generator, dtype=torch.bfloat16)
    model.kernels = Kernels("grouped")  # one graph on the CPU too (as test_generate_compile)
    v = model.vocab
    prompts = [[v.special_id("<bod>"), v["text"].start + 3, v.special_id("<boi>")]] * 2
    config = _config(guidance_scale=2.0)
    eager = generate(model, prompts, config)
    decoder = CachedDecoder(model, 4, cache_slots(model, prompts, config))
    graphs = []

    def backend(graph, example_inputs):  # no inductor: count the traced graphs, run them as they are
        graphs.append(graph)
        return graph.forward

    decoder._step = torch.compile(model.decode_step, backend=backend, fullgraph=True)
    decoder.compiled = True
    compiled = generate(model, prompts, config, decoder)
    assert len(graphs) == 1, "the step was traced again after a diffusion block"
    assert [r.tokens for r in compiled] == [r.tokens for r in eager]
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a.latents[0], b.latents[0], rtol=0, atol=0)
    torch._dynamo.reset()


# ---------------------------------------------------------------- mot generate


DIFFUSION_MODALITIES = [DEMO_MODALITIES[0],
                        ModalityConfig("image", 512, objective="diffusion", latent_channels=32, latent_grid=8,
                                       patch_size=2),  # the demo VQGAN: 8x8 codes of 32 channels
                        DEMO_MODALITIES[2]]


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory):
    return _run_folder(tmp_path_factory.mktemp("gen-diffusion"), DIFFUSION_MODALITIES)


def test_generate_draws_diffusion_images_from_their_latents(diffusion_run, tmp_path, capsys):
    out = tmp_path / "page.html"
    code = _mot("generate", "--ckpt", str(diffusion_run), "--prompt", "a red square", "--then", "image",
                "--max-tokens", "20", "--samples", "2", "--guidance-scale", "2", "--diffusion-steps", "3",
                "--diffusion-eta", "0", "--device", "cpu", "--out", str(out))
    assert code == 0, capsys.readouterr().err
    record = json.loads(out.with_suffix(".json").read_text())
    specials = {name: record["vocab"]["special_start"] + i for i, name in enumerate(record["vocab"]["special_tokens"])}
    image_start = record["vocab"]["modalities"][IMAGE]["start"]
    page = out.read_text()
    for i, sample in enumerate(record["samples"], 1):
        tokens = sample["tokens"]
        assert tokens[16] == specials["<eoi>"], "16 latent tokens (8x8 grid in 2x2 patches), then <eoi>"
        assert tokens[:16] == [image_start] * 16, "the span's ids are the placeholder"
        assert sample["latent_spans"] == 1
        png = out.with_name(f"page-sample{i}-image1.png")
        assert Image.open(png).size == (64, 64) and f'src="{png.name}"' in page
    assert "diffusion_steps=3" in page
    from safetensors.torch import load_file

    latents = load_file(out.with_name("page-latents.safetensors"))
    assert set(latents) == {"sample1-image1", "sample2-image1"} and latents["sample1-image1"].shape == (16, 128)


def test_colour_match_decodes_diffusion_latents(diffusion_run, tmp_path):
    from mot.generate.demo_eval import colour_match
    from mot.generate.prompt import load_tokenizers
    from mot.runs import load_for_inference

    model, _, folder = load_for_inference(diffusion_run)
    tokenizers = load_tokenizers(folder, model.vocab)
    with pytest.raises(ValueError, match="latent codec"):
        colour_match(model, tokenizers, per_colour=1)
    report = colour_match(model, tokenizers, per_colour=1, out_dir=tmp_path,
                          codecs=load_span_codecs(model, folder), diffusion_steps=2)
    assert report["images"] == 6 and 0 <= report["rate"] <= 1
    assert Image.open(tmp_path / "colour_grid.png").size[0] > 64


# ---------------------------------------------------------------- images in prompts (captioning)


def _latents(seed: int, count: int = 1) -> torch.Tensor:
    return torch.randn(count, N, 16, generator=torch.Generator().manual_seed(seed)).squeeze(0)


def _image_prompts(v) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Text, an image span, text; of different lengths (the shorter one left-padded), one with two images."""
    bod, boi, eoi = (v.special_id(s) for s in ("<bod>", "<boi>", "<eoi>"))
    span = [boi, *[v["image"].start] * N, eoi]
    text = v["text"].start
    prompts = [[bod, text + 3, text + 8, *span, text + 5, text + 7, *span, text + 2],
               [bod, text + 1, *span, text + 4]]
    return prompts, [[_latents(1), _latents(2)], [_latents(3)]]


def _full_logits(model, ids: list[int], latents: list[torch.Tensor]) -> torch.Tensor:
    """Next-token logits after `ids` from one full forward: each image span its clean latents at t = 0, under
    the trainer's mask (bidirectional inside a span, causal elsewhere)."""
    tokens = torch.tensor([ids])
    span = torch.full_like(tokens, -1)
    starts = [i for i, t in enumerate(ids) if t == model.vocab["image"].start and ids[i - 1] != t]
    for k, a in enumerate(starts):
        span[0, a : a + N] = k
    z = {IMAGE: torch.cat(latents)} if latents else None
    times = {IMAGE: torch.zeros(N * len(latents))} if latents else None
    out = model(ModelInputs(tokens, attn_mask=mixed_mask(torch.zeros_like(tokens), span), latents=z, timesteps=times))
    return out.logits[0, -1].float()


@pytest.mark.parametrize("untie", [("attn", "ffn", "norm"), ()], ids=["mot", "dense"])
@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["plain", "guided"])
def test_cached_prefill_of_prompt_images_equals_the_full_forward(untie, scale, generator):
    model = _model(generator, untie)
    prompts, latents = _image_prompts(model.vocab)
    config = _config(guidance_scale=scale, max_new_tokens=1)
    decoder = _decoder(model, prompts, config)
    results = generate(model, prompts, config, decoder, prompt_latents=latents)
    with torch.no_grad():
        for row, (prompt, z) in enumerate(zip(prompts, latents, strict=True)):
            torch.testing.assert_close(decoder.logits[0][row], _full_logits(model, prompt, z), rtol=0, atol=1e-6)
            for a, b in zip(results[row].prompt_latents, z, strict=True):
                assert torch.equal(a, b.float())
        # The latents matter: other latents, other logits.
        other = _full_logits(model, prompts[1], [_latents(9)])
        assert not torch.allclose(decoder.logits[0][1], other, atol=1e-3)


@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["plain", "guided"])
def test_greedy_captioning_equals_full_recompute(scale, generator):
    """Text after a prompt image, greedily: every token the argmax (under the constraints) of a full forward over
    the sequence so far, prompt latents at t = 0."""
    model = _model(generator)
    v = model.vocab
    prompts, latents = _image_prompts(v)
    bias = {v.special_id(s): -50.0 for s in ("<boi>", "<bos>", "<eod>")}  # text only: a caption
    config = _config(guidance_scale=scale, max_new_tokens=5)
    results = generate(model, prompts, config, _decoder(model, prompts, config, bias), prompt_latents=latents)
    rules = ModalityConstraints(v, N)
    shift = torch.zeros(v.size)
    for token, value in bias.items():
        shift[token] = value
    with torch.no_grad():
        for prompt, z, result in zip(prompts, latents, results, strict=True):
            ids, state, expected = list(prompt), rules.start(prompt, config.max_new_tokens), []
            for _ in range(config.max_new_tokens):
                logits = (_full_logits(model, ids, z) + shift).masked_fill(~rules.allowed([state], "cpu")[0],
                                                                          float("-inf"))
                token = int(logits.argmax())
                expected.append(token)
                ids.append(token)
                state = rules.advance(state, token)
            assert result.tokens == expected
            assert all(v["text"].start <= t < v["text"].stop for t in result.tokens)


def test_generate_captions_a_prompt_image_of_a_diffusion_checkpoint(diffusion_run, tmp_path, capsys):
    image, _ = _media(tmp_path)
    out = tmp_path / "caption.html"
    code = _mot("generate", "--ckpt", str(diffusion_run), "--image", str(image), "--prompt", "a picture of",
                "--max-tokens", "6", "--samples", "2", "--guidance-scale", "2", "--seed", "1", "--device", "cpu",
                "--out", str(out))
    assert code == 0, capsys.readouterr().err
    record = json.loads(out.with_suffix(".json").read_text())
    specials = {name: record["vocab"]["special_start"] + i for i, name in enumerate(record["vocab"]["special_tokens"])}
    image_start = record["vocab"]["modalities"][IMAGE]["start"]
    for sample in record["samples"]:
        prompt = sample["prompt"]
        boi = prompt.index(specials["<boi>"])
        assert prompt[boi + 1 : boi + 17] == [image_start] * 16 and prompt[boi + 17] == specials["<eoi>"], \
            "the prompt image is 16 latent tokens (8x8 grid in 2x2 patches)"
        assert len(sample["tokens"]) > 0
    page = out.read_text()
    png = out.with_name("caption-prompt-image1.png")
    assert Image.open(png).size == (64, 64) and f'src="{png.name}"' in page, "the prompt image, drawn from its latents"
    assert "no latents" not in page and "a picture of" in page
    assert page.count("<h2>sample") == 2
