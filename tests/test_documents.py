"""Interleaved documents: the JSONL format, Hugging Face captioned pairs, image and audio loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from mot.data.documents import (
    AudioSegment,
    HFDocuments,
    ImageSegment,
    JsonlDocuments,
    TextSegment,
    load_audio,
    load_image,
)
from mot.data.media import BadInput
from mot.data.sources import open_documents


def _png(path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _wav(path, wave: np.ndarray, rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wave, rate)


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_reads_segments_in_order_with_paths_relative_to_the_file(tmp_path):
    _png(tmp_path / "images/000001.png", np.zeros((8, 8, 3), np.uint8))
    _wav(tmp_path / "audio/000001.wav", np.zeros(100, np.float32), 8000)
    _write_jsonl(tmp_path / "docs.jsonl", [
        {"id": "doc-000001", "segments": [{"type": "text", "text": "a cat"}, {"type": "image", "path":
         "images/000001.png"}, {"type": "audio", "path": "audio/000001.wav"}, {"type": "text", "text": "end"}]},
        {"id": "doc-000002", "segments": [{"type": "text", "text": "only text"}]},
    ])
    source = open_documents(tmp_path / "docs.jsonl")
    assert isinstance(source, JsonlDocuments)
    docs = list(source)
    assert [d.id for d in docs] == ["doc-000001", "doc-000002"]
    first = docs[0].segments
    assert [type(s) for s in first] == [TextSegment, ImageSegment, AudioSegment, TextSegment]
    assert first[0].text == "a cat" and first[1].path == tmp_path / "images/000001.png"
    assert first[2].path == tmp_path / "audio/000001.wav"
    assert source.skipped == []
    assert [d.id for d in open_documents(tmp_path)] == ["doc-000001", "doc-000002"]  # the folder reads too


def test_jsonl_missing_file_warns_with_the_row_number_and_is_counted(tmp_path):
    _png(tmp_path / "images/ok.png", np.zeros((4, 4, 3), np.uint8))
    _write_jsonl(tmp_path / "docs.jsonl", [
        {"id": "a", "segments": [{"type": "image", "path": "images/ok.png"}]},
        {"id": "b", "segments": [{"type": "text", "text": "x"}, {"type": "image", "path": "images/gone.png"}]},
        {"id": "c", "segments": [{"type": "video", "path": "v.mp4"}]},
        {"id": "d", "segments": [{"type": "text", "text": "y"}]},
    ])
    source = JsonlDocuments(tmp_path / "docs.jsonl")
    with pytest.warns(UserWarning) as record:
        ids = [d.id for d in source]
    assert ids == ["a", "d"]
    messages = [str(w.message) for w in record]
    assert any("row 2" in m and "gone.png" in m for m in messages), messages
    assert any("row 3" in m and "video" in m for m in messages), messages
    assert source.skipped_counts() == {"missing_file": 1, "bad_row": 1}


def _pair_rows(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) for _ in range(2)]
    for i, pixels in enumerate(images):
        _png(tmp_path / f"img{i}.png", pixels)
    waves = [rng.uniform(-0.5, 0.5, 400).astype(np.float32) for _ in range(2)]
    for i, wave in enumerate(waves):
        _wav(tmp_path / f"clip{i}.wav", wave, 8000)
    return images, waves


def test_hf_parquet_image_caption_pairs_give_both_orders(tmp_path):
    import datasets

    images, _ = _pair_rows(tmp_path)
    ds = datasets.Dataset.from_dict({
        "id": ["p0", "p1"], "picture": [str(tmp_path / "img0.png"), str(tmp_path / "img1.png")],
        "alt": ["red thing", "blue thing"],
    }).cast_column("picture", datasets.Image())
    ds.to_parquet(str(tmp_path / "pairs.parquet"))
    source = open_documents(tmp_path / "pairs.parquet", image_column="picture", caption_column="alt",
                            cache_dir=str(tmp_path / "cache"))
    assert isinstance(source, HFDocuments)
    docs = list(source)
    assert [d.id for d in docs] == ["p0#image-text", "p0#text-image", "p1#image-text", "p1#text-image"]
    image_first, text_first = docs[2].segments, docs[3].segments
    assert isinstance(image_first[0], ImageSegment) and image_first[1] == TextSegment("blue thing")
    assert text_first[0] == TextSegment("blue thing") and isinstance(text_first[1], ImageSegment)
    # The parquet holds the PNG bytes; decoding them gives back the pixels.
    pixels = (load_image(image_first[0]).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(pixels, images[1])


def test_hf_jsonl_audio_transcript_pairs_give_both_orders(tmp_path):
    _, waves = _pair_rows(tmp_path)
    _write_jsonl(tmp_path / "speech.jsonl", [
        {"audio": "clip0.wav", "transcript": "hello"}, {"audio": "clip1.wav", "transcript": "world"},
        {"audio": "missing.wav", "transcript": "lost"},
    ])
    source = open_documents(tmp_path / "speech.jsonl", cache_dir=str(tmp_path / "cache"))
    assert isinstance(source, HFDocuments)
    with pytest.warns(UserWarning, match="row 2"):
        docs = list(source)
    assert [d.id for d in docs] == ["row-000000#audio-text", "row-000000#text-audio",
                                    "row-000001#audio-text", "row-000001#text-audio"]
    assert docs[1].segments[0] == TextSegment("hello") and docs[1].segments[1].path == tmp_path / "clip0.wav"
    assert source.skipped_counts() == {"missing_file": 2}  # both orders of the row
    wave = load_audio(docs[2].segments[0])
    np.testing.assert_allclose(wave.numpy(), waves[1], atol=1e-4)  # 16-bit WAV


def test_hf_segments_column_reads_like_jsonl(tmp_path):
    import datasets

    _png(tmp_path / "images/x.png", np.zeros((4, 4, 3), np.uint8))
    ds = datasets.Dataset.from_dict({"id": ["s0"], "segments": [[
        {"type": "text", "text": "hi", "path": None}, {"type": "image", "text": None, "path": "images/x.png"}]]})
    ds.to_parquet(str(tmp_path / "docs.parquet"))
    docs = list(open_documents(tmp_path / "docs.parquet", cache_dir=str(tmp_path / "cache")))
    assert docs[0].id == "s0"
    assert docs[0].segments == [TextSegment("hi"), ImageSegment(path=tmp_path / "images/x.png")]


def test_load_image_rgb_resized_and_center_cropped(tmp_path):
    gray = np.zeros((8, 16), np.uint8)
    gray[:, 4:12] = 200  # a bright centre band: what the centre crop keeps
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    image = load_image(ImageSegment(path=tmp_path / "g.png"), resolution=4)
    assert image.shape == (3, 4, 4) and image.dtype == torch.float32
    assert image.min() > 0.7  # only the band is left after the crop
    assert torch.equal(image[0], image[1])


def test_load_audio_mono_and_resampled(tmp_path):
    t = np.arange(800) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 200 * t), np.sin(2 * np.pi * 200 * t)], axis=1).astype(np.float32) * 0.5
    _wav(tmp_path / "s.wav", stereo, 8000)
    wave = load_audio(AudioSegment(path=tmp_path / "s.wav"), sample_rate=16000)
    assert wave.shape == (1600,)
    reference = 0.5 * np.sin(2 * np.pi * 200 * np.arange(1600) / 16000)
    np.testing.assert_allclose(wave.numpy()[100:-100], reference[100:-100], atol=0.02)
    waveform = load_audio(AudioSegment(data=stereo, sample_rate=8000))
    np.testing.assert_allclose(waveform.numpy(), stereo[:, 0], atol=1e-6)


def test_corrupt_files_raise_bad_input_with_a_reason(tmp_path):
    _png(tmp_path / "ok.png", np.zeros((16, 16, 3), np.uint8))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(BadInput) as err:
        load_image(ImageSegment(path=tmp_path / "cut.png"))
    assert err.value.reason == "corrupt_image"
    with pytest.raises(BadInput) as err:
        load_audio(AudioSegment(path=tmp_path / "junk.wav"))
    assert err.value.reason == "corrupt_audio"
    with pytest.raises(BadInput) as err:
        load_audio(AudioSegment(path=tmp_path / "nowhere.wav"))
    assert err.value.reason == "missing_file"
