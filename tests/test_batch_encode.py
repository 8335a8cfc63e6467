"""Batched encoding (mot.data.batch_encode) gives each tokenizer's own ids, and prepare's chunk bookkeeping
(DocumentDecoder.decode's image rows and feature rows) gives every document its own media, also around
skipped documents, in one process and with workers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mot.config import ModalityConfig
from mot.data.batch_encode import ImageBatchEncoder, SpeechBatchEncoder
from mot.data.documents import AudioSegment, Document, ImageSegment, TextSegment
from mot.data.encode import DocumentEncoder, vocab_layout
from mot.data.media import BadInput, decode_image, load_audio
from mot.data.prepare import prepare
from mot.data.shards import ShardedCorpus
from mot.data.synthetic_docs import speech_like, wav_bytes
from mot.tokenize.image import ImageTokenizer, VQGANConfig
from mot.tokenize.speech import SpeechTokenizer
from mot.vocab import UnifiedVocab
from tests.conftest import tiny_config
from tests.fakes import FakeText

DEMO_SPEECH = Path(__file__).resolve().parents[1] / "tokenizers" / "demo" / "speech"
SR = 16_000
MAX_DOC_TOKENS = 400


def tiny_vqgan() -> ImageTokenizer:
    """A randomly initialised VQGAN (factor 2, 32 codes), the same weights on every call."""
    config = VQGANConfig(resolution=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32, embed_dim=8,
                         n_embed=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ImageTokenizer(config).eval()


@pytest.fixture(scope="module")
def vqgan() -> ImageTokenizer:
    return tiny_vqgan()


@pytest.fixture(scope="module")
def speech() -> SpeechTokenizer:
    return SpeechTokenizer.load(DEMO_SPEECH)


def _wave(seed: int, seconds: float, rate: int = SR) -> np.ndarray:
    return speech_like(np.random.default_rng(seed), seconds, rate).astype(np.float32) / 32768


# ---------------------------------------------------------------- the batch encoders


def test_image_batch_encoder_gives_the_codes_of_encode_per_image(vqgan):
    gen = torch.Generator().manual_seed(1)
    for height, width in ((16, 16), (24, 32)):
        images = torch.randint(0, 256, (7, 3, height, width), generator=gen, dtype=torch.uint8)
        reference = torch.stack([vqgan.encode(image.float() / 255) for image in images])  # one at a time
        assert reference.shape == (7, height // 2 * (width // 2))
        assert len(reference.unique()) > 16  # random weights, yet no collapse onto a few codes
        for batch_size in (3, 4, 64):  # 3 and 4 do not divide 7
            got = ImageBatchEncoder(vqgan, "cpu", batch_size=batch_size)(images)
            assert got.dtype == torch.int64 and torch.equal(got, reference), (height, width, batch_size)
        bounded = ImageBatchEncoder(vqgan, "cpu")
        bounded.max_pixels = 2 * height * width  # the CPU's pixel bound: batches of 2
        assert torch.equal(bounded(images), reference)
    with pytest.raises(ValueError, match="uint8"):
        ImageBatchEncoder(vqgan, "cpu")(images.float())
    with pytest.raises(ValueError, match="downsampling factor 2"):
        ImageBatchEncoder(vqgan, "cpu")(images[..., :15])


def test_speech_batch_encoder_over_concatenated_features_gives_encode_per_clip(speech):
    clips = [torch.from_numpy(_wave(seed, seconds)) for seed, seconds in ((0, 0.9), (1, 0.33), (2, 1.7), (3, 0.05))]
    features = torch.cat([speech.features(clip) for clip in clips])
    reference = torch.cat([speech.encode(clip) for clip in clips])
    assert features.shape == (len(reference), speech.config.unit_dim) and len(reference) == 45 + 16 + 85 + 2
    assert len(reference.unique()) >= 8  # speech-like clips: not one unit throughout
    encoder = SpeechBatchEncoder(speech, "cpu")
    got = encoder(features)
    assert got.dtype == torch.int64 and torch.equal(got, reference)
    assert encoder(features[:0]).shape == (0,)


# ---------------------------------------------------------------- documents


def _png(seed: int, height: int, width: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def documents() -> list[Document]:
    """Images of two sizes, audio as arrays and as WAV bytes at two rates; bad documents in the middle whose
    good media were decoded before the bad part was found."""
    img = lambda seed, h=16, w=16: ImageSegment(data=_png(seed, h, w))
    wav = lambda seed, seconds, rate=SR: AudioSegment(data=_wave(seed, seconds, rate), sample_rate=rate)
    return [
        Document("d0", [TextSegment("a small red thing"), img(0)]),
        Document("d1", [img(1, 24, 32), wav(1, 0.5), TextSegment("after the sound")]),
        Document("d2-too-long", [img(2), wav(2, 0.4), img(3, 24, 32), TextSegment("x" * 300)]),
        Document("d3", [AudioSegment(data=wav_bytes((_wave(3, 0.3, 8000) * 32767).astype(np.int16), 8000)),
                        img(4, 24, 32)]),
        Document("d4-corrupt", [img(5), wav(5, 0.2), TextSegment("then a broken image"),
                                ImageSegment(data=b"\x89PNG not really")]),
        Document("d5", [img(6), TextSegment("two images"), img(7, 24, 32), wav(7, 0.6)]),
        Document("d6-empty", [TextSegment("")]),
        Document("d7", [TextSegment("only text here")]),
        Document("d8", [wav(8, 0.25), img(9)]),
    ]


SKIPPED = {"d2-too-long": "too_long", "d4-corrupt": "corrupt_image", "d6-empty": "empty"}


def tokenizers(vqgan, speech) -> dict:
    return {"text": FakeText(), "image": vqgan, "speech": speech}


def _vocab() -> UnifiedVocab:
    return UnifiedVocab(tiny_config(modalities=[ModalityConfig("text", 40), ModalityConfig("image", 32),
                                                ModalityConfig("speech", 128)]))


def hand_ids(doc: Document, vqgan, speech, vocab: UnifiedVocab) -> np.ndarray:
    """The unified ids written out from the layout with each tokenizer's own encode (one item at a time)."""
    sp, ids = vocab.special_id, [vocab.special_id("<bod>")]
    for seg in doc.segments:
        if isinstance(seg, TextSegment):
            ids += (FakeText().encode(seg.text) + vocab["text"].start).tolist()
        elif isinstance(seg, ImageSegment):
            codes = vqgan.encode(decode_image(seg).float() / 255) + vocab["image"].start
            ids += [sp("<boi>"), *codes.tolist(), sp("<eoi>")]
        else:
            units = speech.encode(load_audio(seg, SR)) + vocab["speech"].start
            ids += [sp("<bos>"), *units.tolist(), sp("<eos>")]
    return np.array([*ids, sp("<eod>")])


def test_a_chunk_encodes_each_document_as_alone_around_skipped_ones(vqgan, speech):
    vocab, docs = _vocab(), documents()
    encoder = DocumentEncoder(tokenizers(vqgan, speech), vocab_layout(vocab), max_doc_tokens=MAX_DOC_TOKENS,
                              image_resolution=None, sample_rate=SR)
    good = [d for d in docs if d.id not in SKIPPED]
    alone = {}
    for doc in docs:
        if doc.id in SKIPPED:
            with pytest.raises(BadInput) as err:
                encoder.encode(doc)
            assert err.value.reason == SKIPPED[doc.id]
        else:
            alone[doc.id] = encoder.encode(doc)
            np.testing.assert_array_equal(alone[doc.id], hand_ids(doc, vqgan, speech, vocab), err_msg=doc.id)

    chunk = encoder.decoder.decode(docs)
    # Only the kept documents' media stay in the chunk: the bad ones' images and audio were taken out again.
    kept_images = [s for d in good for s in d.segments if isinstance(s, ImageSegment)]
    assert {size: len(batch) for size, batch in chunk.images.items()} == {
        (16, 16): sum(decode_image(s).shape[1:] == (16, 16) for s in kept_images),
        (24, 32): sum(decode_image(s).shape[1:] == (24, 32) for s in kept_images)}
    kept_units = sum(speech.encode(load_audio(s, SR)).numel() for d in good for s in d.segments
                     if isinstance(s, AudioSegment))
    assert chunk.features.shape[0] == kept_units and chunk.counts["images"] == len(kept_images)

    arrays, ids, skipped = encoder.encode_chunk(docs)
    assert ids == [d.id for d in good]
    assert {s["id"]: s["reason"] for s in skipped} == SKIPPED
    for doc_id, array in zip(ids, arrays, strict=True):
        np.testing.assert_array_equal(array, alone[doc_id], err_msg=doc_id)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_prepare_with_real_tokenizers_writes_each_documents_own_ids(vqgan, speech, num_workers, tmp_path):
    vocab, docs = _vocab(), documents()
    stats = prepare(docs, tokenizers(vqgan, speech), vocab, tmp_path, num_workers=num_workers, shard_size=5,
                    max_doc_tokens=MAX_DOC_TOKENS, show_progress=False, image_resolution=None, sample_rate=SR,
                    device="cpu")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    options = {k: manifest["options"][k] for k in ("image_resolution", "sample_rate", "image_policy")}
    assert options["sample_rate"] == SR and manifest["options"]["image_precision"] == "fp32"
    assert (stats.shards, stats.documents, stats.skipped) == (2, 6, {"corrupt_image": 1, "empty": 1, "too_long": 1})
    skipped = json.loads((tmp_path / "skipped.json").read_text())
    assert {d["id"]: d["reason"] for d in skipped["documents"]} == SKIPPED

    reference = DocumentEncoder(tokenizers(vqgan, speech), vocab_layout(vocab), max_doc_tokens=MAX_DOC_TOKENS,
                                **options)
    corpus = ShardedCorpus(tmp_path)
    assert corpus.ids == [d.id for d in docs if d.id not in SKIPPED]
    expected = {d.id: reference.encode(d) for d in docs if d.id not in SKIPPED}
    for i, doc_id in enumerate(corpus.ids):
        np.testing.assert_array_equal(np.asarray(corpus.document(i)), expected[doc_id], err_msg=doc_id)
    assert manifest["tokens"] == sum(len(a) for a in expected.values())
    kept_images = sum(isinstance(s, ImageSegment) for d in docs if d.id not in SKIPPED for s in d.segments)
    assert stats.profile["counts"]["images"] == kept_images == 6  # counted where decoded
