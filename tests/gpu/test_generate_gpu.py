"""Generation on CUDA: the static decode step under torch.compile and CUDA graphs (`CachedDecoder(compile=True)`,
what `mot generate --compile` runs) samples the tokens that eager generation samples, under a fixed seed.

Random-weight tiny models (tests/conftest.py tiny_config), guided generation (two rows a sample) over prompts of
different lengths (left padding) that open image and speech spans.

- bf16, MoT: the compiled step (inductor kernels, replayed as CUDA graphs) against the same static step run
  untraced. Inductor fuses the norms and the attention's pointwise work and rounds to bf16 in other places than
  eager does, so logits differ by a few bf16 ulps, and where two candidates are that close the argmax (or the
  Gumbel-max draw) can legitimately flip; from there on the rows feed different tokens. So each row is compared
  token for token up to its first difference, the logits of every step up to it within bf16 tolerance, and a
  difference is accepted only at a near-tie of the two candidates' scores in both runs (`compare`).
- fp32, MoT: eager generation (attention over the filled slots only) against the untraced static step (attention
  over every slot under the visible mask): the link between the static step and eager generation, exact enough
  in fp32 that any difference must come from a near-tie of 1e-4. (The compiled MoT step is one graph in bf16
  only: the grouped matmul, `torch._grouped_mm`, takes bf16.) A model whose image tower's final norm gain is 2%
  off must fail the same comparison: the check is not vacuous.
- fp32, dense: the compiled step with CUDA graphs against eager generation, both in fp32: the CUDA-graph
  machinery (static cache addresses, in-place slot writes, the guidance rows' hidden slots, output copies) with
  no bf16 rounding in the way.

The CUDA-graph runs also check that the step compiled to one graph that never recompiles, that inductor skipped
no CUDA graph (`cudagraph_skips`) and that it recorded some, and (bf16) that the same decoder generates the same
again (graphs replayed from the first step, the cache emptied by the next prefill). Each comparison prints how
many sample-steps it compared and how many near-tie flips it accepted (`pytest -m gpu -s`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch._dynamo.utils import counters

from mot.generate import GenerationConfig, generate, loop
from mot.generate.decoder import CachedDecoder
from mot.generate.loop import cache_slots
from mot.generate.sampling import filter_logits
from mot.generate.sampling import sample as real_sample
from mot.model import MoTTransformer
from tests.conftest import randomize_norms, tiny_config
from tests.test_transfusion import diffusion_config

DEVICE = "cuda"  # "cpu" runs the bodies without CUDA graphs (a dry run of the test code, outside tests/gpu)
IMAGE_TOKENS, SPEECH_CAP, NEW_TOKENS = 6, 5, 40
# The logits of these models reach |3.4|. Compiled vs untraced in bf16 measured 0.012 at most on the CPU (inductor
# there too; about one bf16 ulp, 2^-6 at 2..4); this allows 0.04 + 1% (0.07 at 3), room for CUDA's other kernels.
BF16_ATOL, BF16_RTOL = 0.04, 0.01
FP32_ATOL, FP32_RTOL = 1e-4, 1e-4


def tiny_model(dtype: torch.dtype, seed: int, dense: bool = False, kernels: str = "auto") -> MoTTransformer:
    torch.manual_seed(seed)  # the init draws from the global RNG
    cfg = tiny_config(dim=64, ffn_dim=64, max_seq_len=128, untie=[] if dense else ["attn", "ffn", "norm"],
                      kernels=kernels)
    model = MoTTransformer(cfg)
    randomize_norms(model, torch.Generator().manual_seed(seed))  # towers that differ, so routing matters
    return model.to(device=DEVICE, dtype=dtype).eval()


def prompts_of(model: MoTTransformer) -> list[list[int]]:
    """Four prompts of 1 to 4 tokens: one ends with <boi>, one with <bos> (spans from the first step)."""
    v = model.vocab
    bod, text = v.special_id("<bod>"), v["text"].start
    return [[bod, text + 3, v.special_id("<boi>")], [bod, text + 5, text + 9, text + 1], [bod],
            [bod, text + 2, v.special_id("<bos>")]]


class BiasedDecoder(CachedDecoder):
    """Random weights rarely open spans: push <boi>/<bos> up and <eod> down (after the step, outside any graph)."""

    def __init__(self, model: MoTTransformer, rows: int, max_len: int, compile: bool = False,
                 cuda_graph: bool = False):
        super().__init__(model, rows, max_len, compile, cuda_graph)
        v = model.vocab
        self.bias = torch.zeros(v.size, device=self.device)
        self.bias[[v.special_id("<boi>"), v.special_id("<bos>"), v.special_id("<eod>")]] = torch.tensor(
            [3.0, 3.0, -2.0], device=self.device)

    def prefill(self, *args, **kwargs):
        return super().prefill(*args, **kwargs) + self.bias

    def step(self, *args, **kwargs):
        return super().step(*args, **kwargs) + self.bias


@dataclass
class Trace:
    tokens: list[list[int]]  # the generated ids per sample
    logits: list[torch.Tensor]  # per step, (samples, V) float32: the masked logits handed to sample()
    scores: list[torch.Tensor]  # per step, what sample() took the argmax of (greedy: the logits)
    chosen: list[list[int]]  # per step, the id drawn for each sample
    temperature: float


def traced(monkeypatch, model, prompts, config: GenerationConfig, decoder: CachedDecoder) -> Trace:
    """generate(), recording at every step the logits sample() got and the scores it compared: the logits
    (greedy), or the tempered logits minus the log of the Exp(1) noise it drew (redrawn from a copy of the
    generator's state)."""
    logits_seen, scores, chosen = [], [], []

    def recording(logits, sampling, generator):
        state = generator.get_state()
        ids = real_sample(logits, sampling, generator)
        x = logits.float()
        logits_seen.append(x.cpu())
        if sampling.temperature > 0:
            copy = torch.Generator(device=generator.device)
            copy.set_state(state)
            x = filter_logits(x / sampling.temperature, sampling.top_k, sampling.top_p)
            noise = torch.empty_like(x).exponential_(generator=copy).clamp_min_(torch.finfo(x.dtype).tiny)
            x = x - noise.log()
        assert torch.equal(x.argmax(-1), ids), "the recorded scores do not reproduce sample()'s draw"
        scores.append(x.cpu())
        chosen.append(ids.tolist())
        return ids

    monkeypatch.setattr(loop, "sample", recording)
    results = generate(model, prompts, config, decoder)
    monkeypatch.setattr(loop, "sample", real_sample)
    return Trace([r.tokens for r in results], logits_seen, scores, chosen, config.temperature)


def compare(got: Trace, expected: Trace, atol: float, rtol: float) -> dict[str, int]:
    """Per sample: the same ids up to its first difference; the logits of every step up to and including it
    within (atol, rtol); the difference itself a near-tie: the two ids' scores no further apart, in either run,
    than the logits may move (twice the tolerance, over the temperature). Returns the sample-steps compared,
    the flips, and the sample-steps of the shorter run."""
    compared = flips = 0
    steps = min(len(got.chosen), len(expected.chosen))
    for row in range(len(expected.tokens)):
        for step in range(steps):
            a, b = got.logits[step][row], expected.logits[step][row]
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, r=row, s=step: (
                f"sample {r}, step {s}: logits differ beyond tolerance before any token did\n{m}"))
            compared += 1
            mine, theirs = got.chosen[step][row], expected.chosen[step][row]
            if mine == theirs:
                continue
            slack = (2 * atol + rtol * (abs(float(b[mine])) + abs(float(b[theirs])))) / (expected.temperature or 1.0)
            prefer_expected = float(expected.scores[step][row][theirs] - expected.scores[step][row][mine])
            prefer_got = float(got.scores[step][row][mine] - got.scores[step][row][theirs])
            assert prefer_expected <= slack and prefer_got <= slack, (
                f"sample {row}, step {step}: drew {mine} instead of {theirs} with no near-tie: the reference "
                f"prefers {theirs} by {prefer_expected:.4g}, this run {mine} by {prefer_got:.4g} (slack {slack:.4g})")
            flips += 1
            break  # the row now feeds another token: nothing more of it to compare
        else:
            assert got.tokens[row] == expected.tokens[row], f"sample {row}"
    return {"compared": compared, "flips": flips, "of": steps * len(expected.tokens)}


def gen_config(temperature: float) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=temperature, seed=3, image_tokens=IMAGE_TOKENS,
                            speech_max_tokens=SPEECH_CAP, guidance_scale=2.0)


def untraced_static(model, rows: int, slots: int) -> CachedDecoder:
    decoder = BiasedDecoder(model, rows, slots)
    decoder.compiled = True  # the static step (every slot under the visible mask), uncompiled
    return decoder


# Kernels of the models whose decode step compiles to one graph: the CPU dry run takes the grouped matmul too, as
# tests/test_generate_compile.py does (split + matmul reads slice sizes on the host, a graph break).
GRAPH_KERNELS = "grouped" if DEVICE == "cpu" else "auto"


@pytest.fixture
def graphs():
    """Compiled decoders built inside must compile the step to one graph that never recompiles (models built
    with GRAPH_KERNELS)."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def assert_cuda_graphs_replayed() -> None:
    if DEVICE != "cuda":
        return
    assert counters["inductor"]["cudagraph_skips"] == 0, "inductor skipped CUDA graphs (see the warnings above)"
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] > 0, "no CUDA graph was recorded"


def report(name: str, stats: dict[str, int], trace: Trace, model) -> None:
    v = model.vocab
    spans = sum(t in (v.special_id("<boi>"), v.special_id("<bos>")) for row in trace.tokens for t in row)
    print(f"{name}: {stats['compared']} of {stats['of']} sample-steps compared, {stats['flips']} near-tie flips, "
          f"{spans} spans opened in the reference")


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_cuda_graph_generation_matches_the_untraced_static_step_in_bf16(temperature, graphs, monkeypatch):
    model = tiny_model(torch.bfloat16, seed=0, kernels=GRAPH_KERNELS)
    prompts, config = prompts_of(model), gen_config(temperature)
    rows, slots = 2 * len(prompts), cache_slots(model, prompts, config)
    expected = traced(monkeypatch, model, prompts, config, untraced_static(model, rows, slots))
    decoder = BiasedDecoder(model, rows, slots, compile=True)
    got = traced(monkeypatch, model, prompts, config, decoder)
    stats = compare(got, expected, BF16_ATOL, BF16_RTOL)
    report(f"bf16 CUDA graphs vs untraced static step ({'greedy' if temperature == 0 else 'sampled'})", stats,
           expected, model)
    # Most of the generation is compared token for token: flips are rare near-ties, not the rule.
    assert stats["compared"] >= stats["of"] // 2 and stats["of"] >= len(prompts) * 20, stats
    assert len({tuple(t) for t in expected.tokens}) > 1, "the samples should differ"
    v = model.vocab
    assert any(v["image"].start <= t < v["image"].stop for t in expected.tokens[0]), "no image codes generated"
    # The same decoder again (its graphs recorded, its cache emptied by the prefill) repeats the generation.
    again = compare(traced(monkeypatch, model, prompts, config, decoder), got, BF16_ATOL, BF16_RTOL)
    assert again["compared"] >= again["of"] // 2, again
    assert_cuda_graphs_replayed()


def test_eager_generation_matches_the_untraced_static_step_in_fp32(monkeypatch):
    model = tiny_model(torch.float32, seed=1)
    prompts = prompts_of(model)
    for temperature in (0.0, 1.0):
        config = gen_config(temperature)
        rows, slots = 2 * len(prompts), cache_slots(model, prompts, config)
        expected = traced(monkeypatch, model, prompts, config, BiasedDecoder(model, rows, slots))  # eager
        got = traced(monkeypatch, model, prompts, config, untraced_static(model, rows, slots))
        stats = compare(got, expected, FP32_ATOL, FP32_RTOL)
        report(f"fp32 static step vs eager (temperature {temperature})", stats, expected, model)
        assert stats["compared"] >= 0.9 * stats["of"], stats  # a flip in fp32 needs a tie to 1e-4
    # The check is not vacuous: the image tower's final norm gain off by 2% fails it.
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.final_norm.weight[wrong.vocab["image"].index] *= 1.02
    with pytest.raises(AssertionError):
        compare(traced(monkeypatch, wrong, prompts, config, untraced_static(wrong, rows, slots)), expected, FP32_ATOL,
                FP32_RTOL)


def test_dense_cuda_graph_generation_matches_eager_generation_in_fp32(graphs, monkeypatch):
    model = tiny_model(torch.float32, seed=2, dense=True, kernels=GRAPH_KERNELS)
    prompts = prompts_of(model)
    config = gen_config(1.0)
    rows, slots = 2 * len(prompts), cache_slots(model, prompts, config)
    expected = traced(monkeypatch, model, prompts, config, BiasedDecoder(model, rows, slots))  # eager
    got = traced(monkeypatch, model, prompts, config, BiasedDecoder(model, rows, slots, compile=True))
    stats = compare(got, expected, FP32_ATOL, FP32_RTOL)
    report("fp32 dense CUDA graphs vs eager", stats, expected, model)
    assert stats["compared"] >= 0.9 * stats["of"], stats
    assert_cuda_graphs_replayed()


def one_sample_image_prompt(model: MoTTransformer) -> list[list[int]]:
    """One guided sample asked for an image: both rows sit in the image tower for the whole span."""
    v = model.vocab
    return [[v.special_id("<bod>"), v["text"].start + 4, v.special_id("<boi>")]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_graphs_without_inductor_match_eager_generation(dtype, monkeypatch):
    """`CachedDecoder(cuda_graph=True)` (the default of `mot generate` on a GPU): the static step captured per mix
    of towers and replayed, against eager generation. One-tower steps replay graphs of ordinary layers on the
    tower's slices; mixed steps replay the grouped matmul's graph (bf16 on Hopper) or run eager (fp32: split +
    matmul reads slice sizes on the host). Logits within the dtype's tolerance until a near-tie flips a draw."""
    model = tiny_model(dtype, seed=4)
    atol, rtol = (BF16_ATOL, BF16_RTOL) if dtype == torch.bfloat16 else (FP32_ATOL, FP32_RTOL)
    for prompts in (prompts_of(model), one_sample_image_prompt(model)):
        config = gen_config(1.0)
        rows, slots = 2 * len(prompts), cache_slots(model, prompts, config)
        expected = traced(monkeypatch, model, prompts, config, BiasedDecoder(model, rows, slots))  # eager
        decoder = BiasedDecoder(model, rows, slots, cuda_graph=True)
        got = traced(monkeypatch, model, prompts, config, decoder)
        stats = compare(got, expected, atol, rtol)
        report(f"{dtype} CUDA graphs without inductor vs eager, {len(prompts)} samples (graphs for "
               f"{sorted(decoder._graphs, key=str)})", stats, expected, model)
        assert stats["compared"] >= (0.5 if dtype == torch.bfloat16 else 0.9) * stats["of"], stats
        image_tower = (0,) * model.vocab["image"].index + (rows,)
        if len(prompts) == 1:  # the image span's steps: both rows in the image tower, its own graph
            assert image_tower + (0,) * (model.cfg.n_modalities - len(image_tower)) in decoder._graphs
        else:  # mixed steps: a graph only where the grouped matmul runs them
            assert (None in decoder._graphs) == (dtype == torch.bfloat16)
        again = compare(traced(monkeypatch, model, prompts, config, decoder), got, atol, rtol)
        assert again["compared"] >= 0.5 * again["of"], again


def test_diffusion_blocks_replay_a_cuda_graph_and_match_eager_generation():
    """Under cuda_graph=True the denoising passes of a diffusion image span's block (the same slots, new latents
    and times each pass) replay one CUDA graph captured at the block's first pass: the clean latents and the
    tokens through <eoi> are those of eager generation (bf16; the same kernels, so within a rounding or two)."""
    torch.manual_seed(5)
    cfg = diffusion_config(patch_size=2, dim=64, ffn_dim=64, max_seq_len=128)
    model = MoTTransformer(cfg)
    randomize_norms(model, torch.Generator().manual_seed(5))
    with torch.no_grad():  # the read-out starts at zero: every prediction would be 0
        for p in model.latent_io.parameters():
            p.copy_(0.3 * torch.randn(p.shape))
    model = model.to(device=DEVICE, dtype=torch.bfloat16).eval()
    v, n = model.vocab, cfg.modalities[1].latent_tokens
    prompts = [[v.special_id("<bod>"), v["text"].start + 3, v.special_id("<boi>")],
               [v.special_id("<bod>"), v["text"].start + 7, v.special_id("<boi>")]]
    config = GenerationConfig(max_new_tokens=n + 6, temperature=0.0, image_tokens=n, diffusion_steps=8,
                              diffusion_clip=2.5, seed=5, guidance_scale=2.0)
    eager = generate(model, prompts, config)
    decoder = CachedDecoder(model, 4, cache_slots(model, prompts, config), cuda_graph=True)
    captures = []
    capture = decoder._capture
    decoder._capture = lambda run: captures.append(1) or capture(run)
    graphed = generate(model, prompts, config, decoder)
    assert decoder._block is not None, "the diffusion block ran eager"
    assert len(captures) == 1 + len(decoder._graphs), "one capture for the block, one per step graph"
    for a, b in zip(graphed, eager, strict=True):
        assert a.tokens[: n + 1] == b.tokens[: n + 1]
        torch.testing.assert_close(a.latents[0], b.latents[0], rtol=0.02, atol=0.02)
    print(f"diffusion block under CUDA graphs: latents max abs diff "
          f"{max(float((a.latents[0] - b.latents[0]).abs().max()) for a, b in zip(graphed, eager, strict=True)):.3g}")
