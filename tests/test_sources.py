"""Inputs at scale: webdataset-style tar shards, streamed parquet, image resize policies and transparency."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from mot.data.documents import AudioSegment, HFDocuments, ImageSegment
from mot.data.media import BadInput, FileRange, decode_image, load_audio, load_image
from mot.data.prepare import prepare
from mot.data.shards import ShardedCorpus
from mot.data.sources import open_documents
from mot.data.tar_source import TarDocuments
from mot.vocab import UnifiedVocab
from tests.conftest import tiny_config
from tests.fakes import FakeImage, FakeSpeech, FakeText

RNG = np.random.default_rng(0)


def _pixels(height: int, width: int, channels: int = 3) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, channels) if channels > 1 else (height, width), dtype=np.uint8)


def _encoded(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _wav(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, RNG.uniform(-0.6, 0.6, int(rate * seconds)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def _write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w" if path.name.endswith(".tar") else "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------- independent references


def _ref_center_crop(image: Image.Image, side: int) -> np.ndarray:
    """Shorter side to `side` (BICUBIC), then the centre side x side, as uint8 (H, W, 3)."""
    scale = side / min(image.size)
    width, height = round(image.width * scale), round(image.height * scale)
    arr = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))
    top, left = (height - side) // 2, (width - side) // 2
    return arr[top : top + side, left : left + side]


def _ref_pad(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Longer side fits (BICUBIC), centred on a white canvas."""
    scale = min(height / image.height, width / image.width)
    w, h = round(image.width * scale), round(image.height * scale)
    canvas = np.full((height, width, 3), 255, np.uint8)
    top, left = (height - h) // 2, (width - w) // 2
    canvas[top : top + h, left : left + w] = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC))
    return canvas


def _ref_ids(segments: list, vocab: UnifiedVocab) -> np.ndarray:
    """Unified ids of a document given as ("text", str) / ("image", bytes) / ("audio", bytes) parts."""
    sp, ids = vocab.special_id, [vocab.special_id("<bod>")]
    for kind, value in segments:
        if kind == "text":
            ids += (FakeText().encode(value) + vocab["text"].start).tolist()
        elif kind == "image":
            pixels = _ref_center_crop(Image.open(io.BytesIO(value)).convert("RGB"), 16)
            image = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)
            ids += [sp("<boi>"), *(FakeImage().encode(image) + vocab["image"].start).tolist(), sp("<eoi>")]
        else:
            frames, rate = soundfile.read(io.BytesIO(value), dtype="float32", always_2d=True)
            assert rate == FakeSpeech.sample_rate
            units = FakeSpeech().encode(torch.from_numpy(frames.mean(1))) + vocab["speech"].start
            ids += [sp("<bos>"), *units.tolist(), sp("<eos>")]
    return np.array([*ids, sp("<eod>")])


def _read_shards(out) -> dict[str, np.ndarray]:
    corpus = ShardedCorpus(out)
    return {corpus.ids[i]: np.asarray(corpus.document(i)) for i in range(len(corpus))}


# ---------------------------------------------------------------- tar shards


def test_tar_shard_prepare_keeps_good_samples_and_counts_each_bad_one(tmp_path):
    img0, img1, img4 = _encoded(_pixels(20, 30)), _encoded(_pixels(16, 16), "JPEG"), _encoded(_pixels(24, 18))
    wav1 = _wav(0.05)
    bad_png = _encoded(_pixels(16, 16))[:60]
    _write_tar(tmp_path / "shard-000.tar", [
        ("s/000.png", img0), ("s/000.txt", b"a red square\n"),
        ("s/001.jpg", img1), ("s/001.json", json.dumps({"caption": "speech and a photo", "url": "x"}).encode()),
        ("s/001.wav", wav1),
        ("s/002.png", bad_png), ("s/002.txt", b"corrupt image"),          # decoded in prepare: corrupt_image
        ("s/003.png", img0),                                                # missing_caption
        ("s/004.png", img4), ("s/004.txt", b"bad audio"), ("s/004.flac", b"fLaC not really"),
        ("s/005.webp", img0), ("s/005.json", b'{"url": "no caption"}'),     # bad_caption
        ("s/006.txt", b"text only: no documents"),
    ])
    source = open_documents(tmp_path / "shard-000.tar")
    assert isinstance(source, TarDocuments) and source.size_hint() == 16  # 8 media, captions unread
    with pytest.warns(UserWarning) as record:
        docs = list(source)
    assert len(record) == 2 and source.skipped_counts() == {"missing_caption": 1, "bad_caption": 1}
    first = docs[0].segments[0]
    # The reader hands on byte ranges: small to pickle, read by the workers.
    assert isinstance(first, ImageSegment) and isinstance(first.data, FileRange)
    assert first.data.read_bytes() == img0 and len(pickle.dumps(docs[0])) < 400

    vocab = UnifiedVocab(tiny_config())
    toks = {"text": FakeText(), "image": FakeImage(), "speech": FakeSpeech()}
    out = tmp_path / "out"
    with pytest.warns(UserWarning) as record:  # the reader's skips warn; the workers' are counted
        stats = prepare(tmp_path / "shard-000.tar", toks, vocab, out, num_workers=0, shard_size=4,
                        show_progress=False)
    assert sorted(str(w.message).split("'")[1] for w in record) == ["s/003", "s/005"]
    expected_counts = {"bad_caption": 1, "corrupt_audio": 2, "corrupt_image": 2, "missing_caption": 1}
    skipped = json.loads((out / "skipped.json").read_text())
    assert stats.skipped == skipped["counts"] == expected_counts
    g = "shard-000/s/"
    assert {d["id"]: d["reason"] for d in skipped["documents"]} == {
        f"{g}003": "missing_caption", f"{g}005": "bad_caption",
        f"{g}002#image-text": "corrupt_image", f"{g}002#text-image": "corrupt_image",
        f"{g}004#audio-text": "corrupt_audio", f"{g}004#text-audio": "corrupt_audio"}
    assert any("shard-000.tar" in d["detail"] and "offset" in d["detail"] for d in skipped["documents"]
               if d["reason"] == "corrupt_image")

    def pair(key, kind, media, caption):
        return {f"{g}{key}#{kind}-text": [(kind, media), ("text", caption)],
                f"{g}{key}#text-{kind}": [("text", caption), (kind, media)]}

    expected = {**pair("000", "image", img0, "a red square"), **pair("001", "image", img1, "speech and a photo"),
                **pair("001", "audio", wav1, "speech and a photo"), **pair("004", "image", img4, "bad audio")}
    got = _read_shards(out)
    assert list(got) == list(expected)  # in tar order; 004's image documents survive its corrupt audio
    for doc_id, parts in expected.items():
        np.testing.assert_array_equal(got[doc_id], _ref_ids(parts, vocab), err_msg=doc_id)


def test_damaged_tars_keep_the_samples_before_the_damage(tmp_path):
    members = [(f"{i:03d}{ext}", data) for i in range(3)
               for ext, data in ((".png", _encoded(_pixels(8, 8))), (".txt", f"caption {i}".encode()))]
    _write_tar(tmp_path / "a.tar", members)
    whole = (tmp_path / "a.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        cut = tar.getmember("002.png").offset_data + 10  # in the last sample's image
    (tmp_path / "a.tar").write_bytes(whole[:cut])
    _write_tar(tmp_path / "b.tar.gz", members)
    packed = (tmp_path / "b.tar.gz").read_bytes()
    (tmp_path / "b.tar.gz").write_bytes(packed[: len(packed) * 2 // 3])
    (tmp_path / "c.tar").write_bytes(b"not a tar at all" * 100)
    _write_tar(tmp_path / "d.tgz", members[:2])
    (tmp_path / "notes.md").write_text("ignored")

    source = open_documents(tmp_path)
    assert isinstance(source, TarDocuments) and [p.name for p in source.paths] == ["a.tar", "b.tar.gz", "c.tar",
                                                                                   "d.tgz"]
    assert source.size_hint() is None  # compressed shards have no cheap scan
    with pytest.warns(UserWarning) as record:
        ids = [d.id for d in source]
    assert [str(w.message).split(":")[0] for w in record] == [str(tmp_path / n) for n in ("a.tar", "b.tar.gz",
                                                                                          "c.tar")]
    assert ids[:4] == ["a/000#image-text", "a/000#text-image", "a/001#image-text", "a/001#text-image"]
    assert "a/002#image-text" not in ids and ids[-2:] == ["d/000#image-text", "d/000#text-image"]
    assert source.skipped_counts() == {"bad_tar": 3}
    assert [s.id for s in source.skipped] == ["a", "b", "c"]
    assert "samples kept from before the damage: 2" in source.skipped[0].detail
    assert TarDocuments(tmp_path / "a.tar").size_hint() == 6  # header scan up to the damage
    gz_doc = next(iter(TarDocuments(tmp_path / "d.tgz")))
    assert gz_doc.segments[0].data == members[0][1]  # a compressed tar's media are bytes in memory


def test_file_range_reads_its_bytes_and_a_bad_range_is_corrupt_input(tmp_path):
    png = _encoded(_pixels(8, 8))
    (tmp_path / "blob.bin").write_bytes(b"x" * 100 + png + b"y" * 7)
    good = FileRange(tmp_path / "blob.bin", 100, len(png))
    assert good.read_bytes() == png
    np.testing.assert_array_equal(decode_image(ImageSegment(data=good)).permute(1, 2, 0).numpy(),
                                  np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    past_end = FileRange(tmp_path / "blob.bin", 100, len(png) + 50)
    with pytest.raises(OSError, match="offset 100"):
        past_end.read_bytes()
    with pytest.raises(BadInput, match="offset 100") as err:
        load_image(ImageSegment(data=past_end))
    assert err.value.reason == "corrupt_image" and "blob.bin" in err.value.detail
    with pytest.raises(BadInput, match="gone.bin") as err:
        load_audio(AudioSegment(data=FileRange(tmp_path / "gone.bin", 0, 10)))
    assert err.value.reason == "corrupt_audio"


# ---------------------------------------------------------------- streamed parquet


def test_parquet_is_streamed_with_raw_binary_and_image_struct_columns(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pixels = [_pixels(6, 6), _pixels(5, 7)]
    images = [_encoded(p) for p in pixels]
    captions = ["red thing", "blue thing"]
    pq.write_table(pa.table({"id": ["p0", "p1"], "image": pa.array(images, pa.binary()), "caption": captions}),
                   tmp_path / "raw.parquet")
    struct = pa.array([{"bytes": b, "path": None} for b in images],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    (tmp_path / "structs").mkdir()
    pq.write_table(pa.table({"image": struct, "caption": captions}), tmp_path / "structs/part-0.parquet")
    datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "caption": captions}) \
        .cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "hf.parquet"))

    for path, ids in (("raw.parquet", ["p0", "p1"]), ("structs", ["row-000000", "row-000001"]),
                      ("hf.parquet", ["row-000000", "row-000001"])):
        source = open_documents(tmp_path / path, cache_dir=str(tmp_path / "cache"))
        assert isinstance(source, HFDocuments) and isinstance(source.dataset, datasets.IterableDataset), path
        assert source.size_hint() is None
        docs = list(source)
        assert [d.id for d in docs] == [f"{i}#{o}" for i in ids for o in ("image-text", "text-image")], path
        for doc, k in zip(docs, (0, 0, 1, 1), strict=True):
            image = next(s for s in doc.segments if isinstance(s, ImageSegment))
            text = next(s for s in doc.segments if not isinstance(s, ImageSegment))
            assert text.text == captions[k]
            np.testing.assert_array_equal(decode_image(image).permute(1, 2, 0).numpy(), pixels[k])
    assert not list((tmp_path / "cache").rglob("*.arrow"))  # nothing converted or cached
    mapped = HFDocuments(tmp_path / "raw.parquet", streaming=False, cache_dir=str(tmp_path / "cache"))
    assert isinstance(mapped.dataset, datasets.Dataset) and mapped.size_hint() == 4


# ---------------------------------------------------------------- resize policies and transparency


def test_center_crop_and_pad_policies_match_a_reference_on_a_non_square_image(tmp_path):
    pixels = _pixels(20, 30)
    segment = ImageSegment(data=_encoded(pixels))
    image = Image.fromarray(pixels)
    crop = decode_image(segment, 16)
    assert crop.dtype == torch.uint8 and crop.shape == (3, 16, 16)
    np.testing.assert_array_equal(crop.permute(1, 2, 0).numpy(), _ref_center_crop(image, 16))
    pad = decode_image(segment, 16, policy="pad").permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(pad, _ref_pad(image, 16, 16))
    assert (pad[:2] == 255).all() and (pad[-3:] == 255).all()  # 30x20 -> 16x11: white bands above and below
    np.testing.assert_array_equal(decode_image(segment, (12, 16), policy="pad").permute(1, 2, 0).numpy(),
                                  _ref_pad(image, 12, 16))
    assert torch.equal(load_image(segment, 16, "pad"), decode_image(segment, 16, "pad").float() / 255)
    with pytest.raises(ValueError, match="'stretch'.*center_crop.*pad"):
        decode_image(segment, 16, policy="stretch")


def test_transparent_pixels_are_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)        # fully transparent
    rgba[0, 1] = (10, 20, 30, 255)      # opaque
    rgba[1, 0] = (100, 0, 200, 128)     # half
    rgba[1, 1] = (0, 0, 0, 255)
    got = decode_image(ImageSegment(data=_encoded(rgba))).permute(1, 2, 0).numpy()
    alpha = 128 / 255
    half = (np.array([100, 0, 200]) * alpha + 255 * (1 - alpha)).astype(np.uint8)
    np.testing.assert_array_equal(got, [[[255, 255, 255], [10, 20, 30]], [half, [0, 0, 0]]])

    la = np.array([[[50, 0], [50, 255]]], np.uint8)  # grey + alpha
    got = decode_image(ImageSegment(data=_encoded(la))).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, [[[255] * 3, [50] * 3]])

    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=0)  # palette entry 0 is transparent
    got = decode_image(ImageSegment(data=buf.getvalue())).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, [[[255, 255, 255], [200, 10, 10]]])


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA-opaque", "P"])
def test_load_image_is_unchanged_for_opaque_images(mode, tmp_path):
    pixels = _pixels(20, 30, 1 if mode == "L" else 4 if mode == "RGBA-opaque" else 3)
    if mode == "RGBA-opaque":
        pixels[..., 3] = 255
    image = Image.fromarray(pixels)
    if mode == "P":
        image = image.convert("P")
    image.save(tmp_path / "x.png")
    opened = Image.open(tmp_path / "x.png")
    for resolution in (None, 16, (12, 18)):
        got = load_image(ImageSegment(path=tmp_path / "x.png"), resolution)
        rgb = opened.convert("RGB")
        if resolution:  # the old code: shorter side to the resolution, BICUBIC, centre crop
            h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
            scale = max(h / rgb.height, w / rgb.width)
            size = (max(w, round(rgb.width * scale)), max(h, round(rgb.height * scale)))
            left, top = (size[0] - w) // 2, (size[1] - h) // 2
            rgb = rgb.resize(size, Image.Resampling.BICUBIC).crop((left, top, left + w, top + h))
        old = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
        assert got.dtype == torch.float32 and torch.equal(got, old), (mode, resolution)
