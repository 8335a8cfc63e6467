"""The demo corpus generator (mot.data.demo) and the pixel checker that scores images against captions."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import mot.data.demo as demo
from mot.data.checker import caption_matches, dominant_colour, parse_caption, shapes_in
from mot.data.demo import generate_demo_corpus

SCALE = 0.01  # 24 images, 4 spoken captions
HAVE_ESPEAK = shutil.which("espeak-ng") is not None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "corpus"
    generate_demo_corpus(out, scale=SCALE, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def corpus_no_speech(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "corpus"
    generate_demo_corpus(out, scale=SCALE, seed=0, speech=False, progress=False)
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _shape(segments: list[dict]) -> tuple[str, ...]:
    return tuple(s["type"] for s in segments)


def test_rows_follow_the_jsonl_format_and_every_path_exists(corpus):
    rows = _rows(corpus / "documents.jsonl")
    ids = [row["id"] for row in rows]
    assert all(re.fullmatch(r"doc-\d{6}", i) for i in ids) and len(set(ids)) == len(ids)
    images_used = []
    for row in rows:
        assert set(row) == {"id", "segments"}
        for seg in row["segments"]:
            if seg["type"] == "text":
                assert set(seg) == {"type", "text"} and seg["text"]
            else:
                assert seg["type"] in ("image", "audio") and set(seg) == {"type", "path"}
                assert not Path(seg["path"]).is_absolute() and (corpus / seg["path"]).is_file()
                if seg["type"] == "image":
                    images_used.append(seg["path"])
    meta = _rows(corpus / "images.jsonl")
    assert sorted(images_used) == sorted(m["path"] for m in meta)  # every image in exactly one document
    assert len(meta) == round(demo.IMAGES_AT_SCALE_1 * SCALE)
    kinds = {_shape(row["segments"]) for row in rows}
    assert {("text", "image"), ("image", "text")} <= kinds
    assert ("text", "image", "text", "image") in kinds or ("text", "image", "text", "image", "text", "image") in kinds
    assert ("image", "text", "image", "text") in kinds or ("image", "text", "image", "text", "image", "text") in kinds
    # an image's caption is the text next to it
    captions = {m["path"]: m["caption"] for m in meta}
    for row in rows:
        segs = row["segments"]
        step = 1 if segs[0]["type"] == "text" else -1
        for i, seg in enumerate(segs):
            if seg["type"] == "image":
                assert segs[i - step]["text"] == captions[seg["path"]]
    summary = json.loads((corpus / "summary.json").read_text())
    assert summary["documents"] == len(rows) and summary["images"] == len(meta)


def test_same_seed_gives_identical_files(corpus, tmp_path):
    again = tmp_path / "again"
    generate_demo_corpus(again, scale=SCALE, seed=0, progress=False)
    assert _files(again) == _files(corpus)
    other = tmp_path / "other"
    generate_demo_corpus(other, scale=SCALE, seed=1, speech=False, progress=False)
    assert (other / "images.jsonl").read_bytes() != (corpus / "images.jsonl").read_bytes()


def test_without_speech_the_images_are_the_same(corpus, corpus_no_speech):
    assert not (corpus_no_speech / "audio").exists()
    rows = _rows(corpus_no_speech / "documents.jsonl")
    assert all(seg["type"] != "audio" for row in rows for seg in row["segments"])
    files, with_speech = _files(corpus_no_speech), _files(corpus)
    assert {k: v for k, v in with_speech.items() if k.startswith("images")} == {
        k: v for k, v in files.items() if k.startswith("images")
    }
    assert json.loads(files["summary.json"])["speech"] is False


def test_missing_espeak_is_reported_once_and_skips_speech(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    summary = generate_demo_corpus(tmp_path / "c", scale=SCALE, progress=False)
    assert summary["speech"] is False and summary["spoken_captions"] == 0
    assert capsys.readouterr().out.count("espeak-ng not found") == 1


def test_refuses_to_overwrite_unless_asked(corpus_no_speech, tmp_path):
    with pytest.raises(FileExistsError, match="documents.jsonl"):
        generate_demo_corpus(corpus_no_speech, scale=SCALE, speech=False, progress=False)
    out = tmp_path / "c"
    generate_demo_corpus(out, scale=2 * SCALE, speech=False, progress=False)
    generate_demo_corpus(out, scale=SCALE, speech=False, progress=False, overwrite=True)
    assert len(list((out / "images").glob("*.png"))) == round(demo.IMAGES_AT_SCALE_1 * SCALE)  # no stale ones


def test_speech_clips_are_16khz_mono_and_audible(corpus):
    if not HAVE_ESPEAK:
        pytest.skip("espeak-ng is not on PATH: the corpus has no speech to check")
    clips = _rows(corpus / "audio.jsonl")
    assert len(clips) == round(demo.SPOKEN_AT_SCALE_1 * SCALE)
    rows = _rows(corpus / "documents.jsonl")
    kinds = {_shape(row["segments"]) for row in rows}
    assert {("text", "audio"), ("audio", "text")} <= kinds
    for clip in clips:
        info = sf.info(corpus / clip["path"])
        assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
        wav, _ = sf.read(corpus / clip["path"], dtype="float32")
        assert 0.5 < len(wav) / 16_000 < 6.0
        assert np.sqrt(np.mean(wav**2)) > 0.01  # not silent
        assert abs(len(wav) / 16_000 - clip["seconds"]) < 1e-3


def test_checker_agrees_with_every_generated_caption(corpus):
    meta = _rows(corpus / "images.jsonl")
    for m in meta:
        path = corpus / m["path"]
        assert caption_matches(m["caption"], path), (m, shapes_in(path))
        assert sorted(shapes_in(path), key=lambda s: s["colour"]) == sorted(m["shapes"], key=lambda s: s["colour"])
        assert parse_caption(m["caption"]) == m["shapes"]


def test_checker_rejects_swapped_captions(corpus):
    meta = _rows(corpus / "images.jsonl")
    agree = [caption_matches(meta[i - 1]["caption"], corpus / meta[i]["path"]) for i in range(len(meta))]
    assert sum(agree) <= 0.2 * len(meta)
    assert not caption_matches("a cat on a mat", corpus / meta[0]["path"])  # names nothing the checker knows


def test_dominant_colour_and_input_types():
    img = torch.full((3, 64, 64), 0.97)
    assert dominant_colour(img) == "none"
    img[:, 10:40, 10:40] = torch.tensor([30, 70, 220]).view(3, 1, 1) / 255  # blue square, large
    img[:, 50:60, 50:60] = torch.tensor([220, 30, 30]).view(3, 1, 1) / 255  # red square, small
    assert dominant_colour(img) == "blue"
    pixels = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert dominant_colour(pixels) == "blue"
    assert caption_matches("a blue square at the top and a red square at the bottom", img, check_positions=False)
    assert not caption_matches("a blue square", img)  # the red one is not mentioned
    assert not caption_matches("a green square in the center and a red square at the bottom", img)
