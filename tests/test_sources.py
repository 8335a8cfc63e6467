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


def test_a_pairs_media_and_caption_are_decoded_once_for_both_orders(tmp_path, monkeypatch):
    from mot.data import encode

    calls = {"image": 0, "audio": 0, "text": 0}

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            calls[kind] += len(args[0]) if kind == "text" else 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(encode, "decode_image", counted("image", encode.decode_image))
    monkeypatch.setattr(encode, "load_audio", counted("audio", encode.load_audio))
    text = FakeText()
    text.encode_batch = counted("text", lambda texts: [FakeText().encode(t) for t in texts])
    images = [_encoded(_pixels(16, 16)) for _ in range(3)]
    wav = _wav(0.05)
    _write_tar(tmp_path / "a.tar", [("s/0.png", images[0]), ("s/0.txt", b"one"), ("s/0.wav", wav),
                                    ("s/1.png", images[1]), ("s/1.txt", b"two"),
                                    ("s/2.png", images[2]), ("s/2.txt", b"one")])  # a caption twice
    vocab = UnifiedVocab(tiny_config())
    prepare(tmp_path / "a.tar", {"text": text, "image": FakeImage(), "speech": FakeSpeech()}, vocab,
            tmp_path / "out", num_workers=0, shard_size=100, show_progress=False)
    assert calls == {"image": 3, "audio": 1, "text": 2}  # not 6, 2 and 8: one decode per sample and caption
    got = _read_shards(tmp_path / "out")
    assert len(got) == 8
    for key, image, caption in (("0", images[0], "one"), ("1", images[1], "two"), ("2", images[2], "one")):
        np.testing.assert_array_equal(got[f"a/s/{key}#image-text"], _ref_ids([("image", image), ("text", caption)],
                                                                             vocab))
        np.testing.assert_array_equal(got[f"a/s/{key}#text-image"], _ref_ids([("text", caption), ("image", image)],
                                                                             vocab))
    np.testing.assert_array_equal(got["a/s/0#text-audio"], _ref_ids([("text", "one"), ("audio", wav)], vocab))


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


def _garble_header(path, member: str) -> None:
    """Overwrite the header of `member` with bytes that are no tar header (tarfile then stops there silently)."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 512] = b"\x07" * 512
    path.write_bytes(bytes(data))


def test_tar_parts_read_the_same_documents_and_skips_as_one_pass(tmp_path):
    members = [(f"k/{i:03d}{ext}", data) for i in range(8)
               for ext, data in ((".png", _encoded(_pixels(8, 8))), (".txt", f"caption {i}".encode()),
                                 *(((".wav", _wav(0.02)),) if i % 3 == 0 else ()))]
    members = [("k/002.cls", b"7") if name == "k/002.txt" else (name, data) for name, data in members]  # no caption
    _write_tar(tmp_path / "a.tar", members)
    _write_tar(tmp_path / "b.tar", members)
    cut = (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "b.tar") as tar:
        end = tar.getmember("k/006.png").offset_data + 5
    (tmp_path / "b.tar").write_bytes(cut[:end])  # truncated in sample 006
    _write_tar(tmp_path / "c.tar", members)
    _garble_header(tmp_path / "c.tar", "k/004.txt")  # damaged in the middle of sample 004
    (tmp_path / "d.tar").write_bytes(b"not a tar at all" * 100)
    _write_tar(tmp_path / "e.tgz", members[:7])  # samples 000-002

    source = TarDocuments(tmp_path)
    with pytest.warns(UserWarning):
        whole = [(d.id, [(type(s).__name__, getattr(s, "text", None) or s.data) for s in d.segments]) for d in source]
    whole_skipped = list(source.skipped)
    assert [(s.id, s.reason) for s in whole_skipped] == [
        ("a/k/002", "missing_caption"), ("b/k/002", "missing_caption"), ("b", "bad_tar"),
        ("c/k/002", "missing_caption"), ("c", "bad_tar"), ("d", "bad_tar"), ("e/k/002", "missing_caption")]
    assert "samples kept from before the damage: 6" in whole_skipped[2].detail  # 000..005 of b
    assert "samples kept from before the damage: 4" in whole_skipped[4].detail  # 000..003 of c

    for part_bytes in (600, 1500, 4096, 10**9):  # ranges ending anywhere: in headers, in data, at samples
        parts = source.parts(part_bytes)
        for name in ("a.tar", "b.tar", "c.tar", "d.tar", "e.tgz"):
            own = [p for p in parts if p.path.name == name]
            assert sum(p.size for p in own) == (tmp_path / name).stat().st_size
            assert len(own) == (1 if name == "e.tgz" else -(-(tmp_path / name).stat().st_size // part_bytes))
        skipped, docs = [], []
        for part in pickle.loads(pickle.dumps(parts)):  # as a worker gets them
            docs += [(d.id, [(type(s).__name__, getattr(s, "text", None) or s.data) for s in d.segments])
                     for d in part.read(lambda *skip, into=skipped: into.append(skip))]
        assert docs == whole, part_bytes
        assert skipped == [(s.id, s.reason, s.detail) for s in whole_skipped], part_bytes


def _outputs(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _tar_corpus(root, poison: int | None = None) -> None:
    """Three tars of captioned images (some with audio): a corrupt image, a missing caption and unreadable audio
    among good samples; sample `poison`'s caption holds POISON (KillingText)."""
    def sample(i: int) -> list[tuple[str, bytes]]:
        caption = f"caption {i}" + (" POISON" if i == poison else "")
        out = [(f"s/{i:03d}.png", _encoded(_pixels(16 + 4 * (i % 3), 16))), (f"s/{i:03d}.txt", caption.encode())]
        return out + ([(f"s/{i:03d}.wav", _wav(0.05))] if i % 4 == 0 else [])

    root.mkdir(parents=True, exist_ok=True)
    _write_tar(root / "t0.tar", [m for i in range(4) for m in sample(i)]
               + [("s/004.png", _encoded(_pixels(16, 16))[:50]), ("s/004.txt", b"corrupt image")])
    _write_tar(root / "t1.tar", [m for i in range(5, 9) for m in sample(i)] + [("s/009.png", _encoded(_pixels(8, 8)))])
    _write_tar(root / "t2.tar", [("s/010.png", _encoded(_pixels(16, 16))), ("s/010.txt", b"unreadable audio"),
                                 ("s/010.wav", b"RIFF\x24\x00\x00\x00WAVEfmt garbage")]
               + [m for i in range(11, 14) for m in sample(i)])


def test_workers_read_the_tars_and_skip_and_count_by_reason_what_one_process_does(tmp_path, monkeypatch):
    from mot.data import pipeline, tar_source

    _tar_corpus(tmp_path / "tars")
    vocab, toks = UnifiedVocab(tiny_config()), {"text": FakeText(), "image": FakeImage(), "speech": FakeSpeech()}

    def run(out, workers):
        with pytest.warns(UserWarning) as record:
            prepare(tmp_path / "tars", toks, vocab, tmp_path / out, num_workers=workers, shard_size=5,
                    show_progress=False)
        # the reader's skip is warned here, in the main process, whoever read the tar
        assert [str(w.message).split("'")[1] for w in record if "skipped" in str(w.message)] == ["s/009"]
        return _outputs(tmp_path / out)

    one = run("one", 0)
    skipped = json.loads(one["skipped.json"])
    assert skipped["counts"] == {"corrupt_audio": 2, "corrupt_image": 2, "missing_caption": 1}
    assert {d["id"]: d["reason"] for d in skipped["documents"]} == {
        "t1/s/009": "missing_caption", "t0/s/004#image-text": "corrupt_image",
        "t0/s/004#text-image": "corrupt_image", "t2/s/010#audio-text": "corrupt_audio",
        "t2/s/010#text-audio": "corrupt_audio"}
    tar_of = {i: f"t{min(i // 5, 2)}" for i in range(14)}
    kept = [f"{tar_of[i]}/s/{i:03d}#{order}" for i in (0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13)
            for order in ("image-text", "text-image", *(("audio-text", "text-audio") if i in (0, 8, 12) else ()))]
    assert list(_read_shards(tmp_path / "one")) == kept  # every good sample; 010's image beside its bad audio

    def no_tar_here(*args, **kwargs):
        raise AssertionError("prepare's main process opened a tar")

    monkeypatch.setattr(tar_source.tarfile, "open", no_tar_here)  # the workers (other processes) read them
    assert run("workers", 2) == one
    monkeypatch.setattr(tar_source, "PART_BYTES", 2048)  # each tar read in byte ranges, by several workers
    assert run("ranges", 2) == one
    monkeypatch.setattr(pipeline.ChunkLoop, "encodes_here", lambda self: True)  # CUDA mode's loop, on the CPU
    assert run("main-encodes", 2) == one


def test_a_prepare_of_tars_killed_part_way_resumes_to_the_uninterrupted_output(tmp_path):
    """The process killed (SIGKILL, in the third tar) keeps the shards it finished; a rerun with workers scans
    the tars, reuses those shards and writes the rest: the output of a run never killed."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests import prepare_worker

    root = Path(__file__).resolve().parents[1]
    _tar_corpus(tmp_path / "tars", poison=12)  # documents 28-31 of 34, in chunks 9 and 10 (shard_size 3)
    marker, out = tmp_path / "marker", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, str(root / "tests" / "prepare_worker.py"), str(tmp_path / "tars"),
                           str(out), str(marker), "--workers", "0"], env=env, cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (out / "manifest.json").exists()
    complete = sorted(p.name for p in out.glob("shard-*.json"))
    assert complete == [f"shard-{i:06d}.json" for i in range(7)]  # documents 0-20: the first two tars

    marker.touch()
    with pytest.warns(UserWarning, match="s/009"):
        prepare_worker.run(str(tmp_path / "tars"), str(tmp_path / "one"), str(marker))
        stats = prepare_worker.run(str(tmp_path / "tars"), str(out), str(marker), workers=2)
    assert (stats.reused_shards, stats.written_shards) == (7, 5)
    assert _outputs(out) == _outputs(tmp_path / "one")


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


def test_parquet_row_groups_read_by_the_workers_give_what_one_pass_gives(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mot.data.parquet_parts import ParquetPart

    (tmp_path / "pairs").mkdir()
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for f, (start, stop) in enumerate(((0, 7), (7, 12))):
        images = [{"bytes": _encoded(_pixels(16, 16)) if i != 3 else b"not an image", "path": None} for i in
                  range(start, stop)]
        images[-1] = {"bytes": None, "path": "missing.png"} if f == 1 else images[-1]  # a file that is not there
        captions = [f"caption {i}" if i != 5 else None for i in range(start, stop)]  # row 5: no caption
        pq.write_table(pa.table({"image": pa.array(images, struct), "caption": captions}),
                       tmp_path / "pairs" / f"part-{f}.parquet", row_group_size=3)  # 3 + 3 + 1, then 3 + 2
    source = open_documents(tmp_path / "pairs")
    parts = source.parts()
    assert [(p.path.name, p.row_group, p.first) for p in parts] == [
        ("part-0.parquet", 0, 0), ("part-0.parquet", 1, 3), ("part-0.parquet", 2, 6),
        ("part-1.parquet", 0, 7), ("part-1.parquet", 1, 10)]
    with pytest.warns(UserWarning, match="file not found"):
        one_pass = [(d.id, [getattr(s, "text", None) for s in d.segments]) for d in source]
    skipped: list = []
    from_parts = [(d.id, [getattr(s, "text", None) for s in d.segments]) for p in parts
                  for d in p.read(lambda *why: skipped.append(why))]
    assert from_parts == one_pass and [s[:2] for s in skipped] == [("row-000011#image-text", "missing_file"),
                                                                   ("row-000011#text-image", "missing_file")]

    vocab = UnifiedVocab(tiny_config())
    toks = {"text": FakeText(), "image": FakeImage(), "speech": FakeSpeech()}
    outputs = {}
    for workers in (0, 2):
        with pytest.warns(UserWarning):
            prepare(tmp_path / "pairs", toks, vocab, tmp_path / f"out{workers}", num_workers=workers, shard_size=6,
                    show_progress=False)
        outputs[workers] = {p.name: p.read_bytes() for p in sorted((tmp_path / f"out{workers}").iterdir())}
    assert outputs[0] == outputs[2]
    skipped = json.loads((tmp_path / "out2" / "skipped.json").read_text())["counts"]
    assert skipped == {"corrupt_image": 2, "missing_file": 2}
    assert len(_read_shards(tmp_path / "out2")) == 2 * (12 - 3)  # rows 3 (corrupt), 5 (no caption), 11 (missing)

    # The main process reads no row: every part goes to the workers.
    monkeypatch.setattr(ParquetPart, "read", lambda self, skip: (_ for _ in ()).throw(AssertionError("read here")))
    with pytest.warns(UserWarning, match="file not found"):
        prepare(tmp_path / "pairs", toks, vocab, tmp_path / "out_workers", num_workers=2, shard_size=6,
                show_progress=False)
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "out_workers").iterdir())} == outputs[2]


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
