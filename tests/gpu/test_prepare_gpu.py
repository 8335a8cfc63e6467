"""prepare's CUDA paths against the CPU: VQGAN codes per precision (the demo VQGAN, and a Chameleon-shaped one),
speech units, and a whole prepare. Each test prints its agreement rates (`pytest -m gpu -s`), for the README.

The Chameleon-shaped VQGAN (tokenizers/vqgan_chameleon.toml) has random weights, but its codebook is replaced by
encoder outputs of other photo-like images (plus a little noise), so its codes spread over the codebook as a
trained one's do instead of collapsing onto a few entries that any rounding could swap.
"""

from __future__ import annotations

import functools
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange

from mot.config import ModalityConfig
from mot.data.batch_encode import DEFAULT_IMAGE_PRECISION, PRECISIONS, ImageBatchEncoder, SpeechBatchEncoder
from mot.data.documents import ImageSegment
from mot.data.media import decode_image
from mot.data.prepare import prepare
from mot.data.shards import ShardedCorpus
from mot.data.synthetic_docs import demo_image, photo_like, speech_like, write_shards
from mot.tokenize.image import ImageTokenizer, load_vqgan_config
from mot.tokenize.load import load_tokenizer
from mot.vocab import UnifiedVocab
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "tokenizers" / "demo"
MIN_AGREEMENT = 0.999
ASSERTED = sorted({"fp32", DEFAULT_IMAGE_PRECISION})  # the others are measured and printed only
N_CHAMELEON, CHAMELEON_BATCH = 24, 10  # 10 does not divide 24: the compiled encoder pads its last batch


def agreement(got: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> tuple[float, int, int]:
    """(share of equal ids, how many differ, how many in all)."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    differ = int((got != expected).sum())
    return 1 - differ / max(1, got.size), differ, got.size


def report(record_property, name: str, got, expected) -> float:
    rate, differ, total = agreement(got, expected)
    print(f"agreement {name}: {rate:.5f} ({differ} of {total} ids differ)")
    record_property(f"agreement {name}", rate)
    return rate


def image_rates(record_property, name: str, tok, images: torch.Tensor, reference: torch.Tensor, device: str,
                precisions=PRECISIONS, batch_size: int = 64, compile_default: bool = False) -> dict[str, float]:
    """Codes of `images` (uint8) by ImageBatchEncoder on `device` in each precision vs the CPU `reference`."""
    rates = {}
    runs = [(p, False) for p in precisions] + ([(DEFAULT_IMAGE_PRECISION, True)] if compile_default else [])
    for precision, compile in runs:
        encoder = ImageBatchEncoder(tok, device, precision=precision, compile=compile, batch_size=batch_size)
        codes = encoder(images).cpu()
        key = f"{precision}{' compiled' if compile else ''}"
        rates[key] = report(record_property, f"{name} {key}", codes, reference)
    return rates


def assert_rates(rates: dict[str, float]) -> None:
    low = {k: round(v, 5) for k, v in rates.items() if k.split()[0] in ASSERTED and v < MIN_AGREEMENT}
    assert not low, f"codes equal to the CPU's below {MIN_AGREEMENT}: {low} (all measured: {rates})"


# ---------------------------------------------------------------- images


def demo_images(n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.stack([decode_image(ImageSegment(data=demo_image(rng, 64)[0])) for _ in range(n)])


def photos(n: int, seed: int, side: int = 512) -> torch.Tensor:
    """uint8 (n, 3, side, side): photo-like JPEGs of 400-800 px, centre-cropped as prepare does."""
    rng = np.random.default_rng(seed)
    return torch.stack([decode_image(ImageSegment(data=photo_like(rng, 400, 800)[0]), side, "center_crop")
                        for _ in range(n)])


def cpu_codes(tok, images: torch.Tensor, batch: int) -> torch.Tensor:
    """The reference: ImageTokenizer.encode on the CPU, in float32."""
    return torch.cat([tok.encode(part.float() / 255) for part in images.split(batch)])


def chameleon_like(config_path: Path, n_images: int, codebook_images: int, side: int | None = None):
    """(tokenizer, test images, their CPU codes): random weights, codebook = a random subset of the latent
    vectors of `codebook_images` other images plus noise of 1% of their spread."""
    config = load_vqgan_config(config_path)
    side = side or config.resolution
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tok = ImageTokenizer(config).eval()
    with torch.no_grad():
        latents = torch.cat([tok.pre_quant(part.float() / 255 * 2 - 1) for part in photos(codebook_images, 100, side)
                             .split(4)])
    vectors = rearrange(latents, "b c h w -> (b h w) c")
    assert len(vectors) >= config.n_embed, "too few codebook images for the codebook"
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(vectors), generator=gen)[: config.n_embed]
    noise = 0.01 * vectors.std(0) * torch.randn(config.n_embed, config.embed_dim, generator=gen)
    with torch.no_grad():
        tok.quantize.embedding.weight.copy_(vectors[pick] + noise)
    images = photos(n_images, 0, side)
    return tok, images, cpu_codes(tok, images, 4)


def test_demo_vqgan_codes_on_cuda_match_the_cpu(record_property):
    tok = load_tokenizer("image", DEMO / "image")
    images = demo_images(512)
    reference = cpu_codes(tok, images, 64)
    assert len(reference.unique()) > 100  # the trained codebook in use, not a few codes
    assert_rates(image_rates(record_property, "demo-vqgan", tok, images, reference, "cuda"))


@pytest.fixture(scope="module")
def chameleon():
    codebook_images = -(-8192 // 1024) + 1  # 32 x 32 latents an image: one image more than the codebook needs
    return chameleon_like(ROOT / "tokenizers" / "vqgan_chameleon.toml", N_CHAMELEON, codebook_images)


def test_chameleon_shaped_vqgan_codes_on_cuda_match_the_cpu(chameleon, record_property):
    tok, images, reference = chameleon
    used = len(reference.unique())
    print(f"chameleon-shaped VQGAN: {len(images)} images of 512 px, {used} distinct codes of 8192")
    assert used > 2000
    rates = image_rates(record_property, "chameleon-vqgan", tok, images, reference, "cuda",
                        batch_size=CHAMELEON_BATCH, compile_default=True)
    assert_rates(rates)


# ---------------------------------------------------------------- speech


def speech_features(tok, clips: int = 48) -> torch.Tensor:
    rng = np.random.default_rng(0)
    waves = [torch.from_numpy(speech_like(rng, float(rng.uniform(0.5, 3.0))).astype(np.float32) / 32768)
             for _ in range(clips)]
    return torch.cat([tok.features(w) for w in waves])


def test_speech_units_on_cuda_match_the_cpu(record_property):
    tok = load_tokenizer("speech", DEMO / "speech")
    features = speech_features(tok)
    reference = tok.units_from_features(features)
    got = SpeechBatchEncoder(tok, "cuda")(features).cpu()
    rate = report(record_property, "speech units", got, reference)
    assert rate >= MIN_AGREEMENT, f"speech units equal to the CPU's: {rate:.5f} < {MIN_AGREEMENT}"


# ---------------------------------------------------------------- a whole prepare


def demo_tars(folder: Path, samples: int = 160) -> Path:
    """Synthetic demo tars (captioned 64 px images, some spoken) and one tar whose only image is corrupt."""
    write_shards("demo", folder, samples=samples, per_tar=samples // 2, audio_fraction=0.4, seed=1)
    png = demo_image(np.random.default_rng(5), 64)[0]
    with tarfile.open(folder / "demo-99999.tar", "w") as tar:
        for name, data in (("bad.png", png[: len(png) // 2]), ("bad.txt", b"a cut image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return folder


def run_prepare(tars: Path, out: Path, device: str, num_workers: int):
    loaders = {m: functools.partial(load_tokenizer, m, str(DEMO / d)) for m, d in (("text", "text"), ("image", "image"),
                                                                     ("speech", "speech"))}
    text = loaders["text"]()
    vocab = UnifiedVocab(tiny_config(modalities=[ModalityConfig("text", text.vocab_size),
                                                 ModalityConfig("image", 512), ModalityConfig("speech", 128)]))
    return prepare(tars, loaders, vocab, out, num_workers=num_workers, shard_size=40, max_doc_tokens=150,
                   show_progress=False, image_resolution=64, sample_rate=16000, device=device)


def compare_prepared(record_property, got: Path, expected: Path) -> float:
    """Same documents, skipped documents and offsets; the share of equal tokens."""
    a, b = ShardedCorpus(got), ShardedCorpus(expected)
    assert a.ids == b.ids
    assert json.loads((got / "skipped.json").read_text()) == json.loads((expected / "skipped.json").read_text())
    shards = json.loads((expected / "manifest.json").read_text())["shards"]
    for shard in shards:
        np.testing.assert_array_equal(np.load(got / shard["offsets_file"]), np.load(expected / shard["offsets_file"]))
    tokens = [np.concatenate([np.load(folder / s["tokens_file"]) for s in shards]) for folder in (got, expected)]
    return report(record_property, "prepare tokens", *tokens)


def test_prepare_on_cuda_with_workers_matches_prepare_on_the_cpu(tmp_path, record_property):
    tars = demo_tars(tmp_path / "tars")
    cpu = run_prepare(tars, tmp_path / "cpu", "cpu", num_workers=8)
    cuda = run_prepare(tars, tmp_path / "cuda", "cuda", num_workers=2)
    print(f"prepare: {cuda.documents} documents, {cuda.tokens} tokens, skipped {cuda.skipped}; "
          f"cpu {cpu.seconds:.1f}s, cuda {cuda.seconds:.1f}s")
    assert cuda.device.startswith("cuda") and cuda.profile["counts"].get("images", 0) > 0
    assert cpu.skipped == cuda.skipped and cpu.skipped.get("corrupt_image") == 2
    assert cpu.skipped.get("too_long", 0) > 0 and cuda.documents == cpu.documents > 200
    rate = compare_prepared(record_property, tmp_path / "cuda", tmp_path / "cpu")
    assert rate >= MIN_AGREEMENT, f"prepare tokens equal to the CPU's: {rate:.5f} < {MIN_AGREEMENT}"
