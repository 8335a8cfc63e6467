"""prepare: documents -> shards that give back each document's exact unified ids; workers, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
from PIL import Image

from mot.data.documents import Document, ImageSegment, TextSegment, load_audio, load_image
from mot.data.prepare import PrepareError, prepare
from mot.data.shards import ShardedCorpus
from mot.vocab import UnifiedVocab
from tests.conftest import tiny_config
from tests.fakes import FakeImage, FakeSpeech, FakeText


def tokenizers() -> dict:
    return {"text": FakeText(), "image": FakeImage(), "speech": FakeSpeech()}


def make_corpus(root, n: int = 7) -> list[dict]:
    """n interleaved documents as JSONL rows with their image and audio files under root."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        size = 16 if i % 2 else 24  # some images need resizing
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"images/{i:06d}.png")
        rate = 8000 if i % 3 else 16000  # some audio needs resampling
        wave = rng.uniform(-0.6, 0.6, int(rate * 0.05 * (1 + i % 3))).astype(np.float32)
        soundfile.write(root / f"audio/{i:06d}.wav", wave, rate)
        segments = [{"type": "text", "text": f"document {i} says hello"}]
        segments.append({"type": "image", "path": f"images/{i:06d}.png"})
        if i % 2 == 0:
            segments.append({"type": "audio", "path": f"audio/{i:06d}.wav"})
        segments.append({"type": "text", "text": "bye" * (i + 1)})
        rows.append({"id": f"doc-{i:06d}", "segments": segments})
    return rows


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def reference_ids(doc: Document, vocab: UnifiedVocab) -> np.ndarray:
    """The expected unified ids, written out directly from the layout."""
    toks, sp = tokenizers(), vocab.special_id
    ids = [sp("<bod>")]
    for seg in doc.segments:
        if isinstance(seg, TextSegment):
            ids += (toks["text"].encode(seg.text) + vocab["text"].start).tolist()
        elif isinstance(seg, ImageSegment):
            codes = toks["image"].encode(load_image(seg, 16)) + vocab["image"].start
            ids += [sp("<boi>"), *codes.tolist(), sp("<eoi>")]
        else:
            units = toks["speech"].encode(load_audio(seg, 8000)) + vocab["speech"].start
            ids += [sp("<bos>"), *units.tolist(), sp("<eos>")]
    return np.array([*ids, sp("<eod>")])


def read_shards(out) -> dict[str, np.ndarray]:
    corpus = ShardedCorpus(out)
    return {corpus.ids[i]: np.asarray(corpus.document(i)) for i in range(len(corpus))}


@pytest.fixture
def vocab() -> UnifiedVocab:
    return UnifiedVocab(tiny_config())


@pytest.fixture
def corpus(tmp_path):
    rows = make_corpus(tmp_path / "corpus")
    write_jsonl(tmp_path / "corpus/docs.jsonl", rows)
    return tmp_path / "corpus/docs.jsonl"


def test_shards_give_back_every_documents_exact_unified_ids(corpus, vocab, tmp_path):
    from mot.data.sources import open_documents

    stats = prepare(corpus, tokenizers(), vocab, tmp_path / "out", num_workers=0, shard_size=3, show_progress=False)
    assert (stats.documents, stats.shards, stats.skipped) == (7, 3, {})
    got = read_shards(tmp_path / "out")
    docs = list(open_documents(corpus))
    assert list(got) == [d.id for d in docs]
    for doc in docs:
        np.testing.assert_array_equal(got[doc.id], reference_ids(doc, vocab), err_msg=doc.id)
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["image_grids"] == {"image": {"h": 4, "w": 4, "order": "row-major"}}
    assert manifest["tokens"] == sum(len(v) for v in got.values()) == stats.tokens
    assert [s["documents"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["vocab"]["modalities"][1] == {"name": "image", "index": 1, "start": 40, "size": 24}
    tokens = np.load(tmp_path / "out" / manifest["shards"][0]["tokens_file"], mmap_mode="r")
    assert tokens.dtype == np.int32 and isinstance(tokens, np.memmap)


def test_two_workers_write_what_one_writes(corpus, vocab, tmp_path):
    prepare(corpus, tokenizers(), vocab, tmp_path / "one", num_workers=0, shard_size=2, show_progress=False)
    prepare(corpus, tokenizers(), vocab, tmp_path / "two", num_workers=2, shard_size=2, show_progress=False)
    for name in sorted(p.name for p in (tmp_path / "one").glob("shard-*.npy")):
        np.testing.assert_array_equal(np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name))
    one, two = read_shards(tmp_path / "one"), read_shards(tmp_path / "two")
    assert one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)


def test_rerun_after_deleting_a_shard_recreates_only_that_shard(corpus, vocab, tmp_path):
    out = tmp_path / "out"
    prepare(corpus, tokenizers(), vocab, out, num_workers=0, shard_size=3, show_progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    (out / "shard-000001.tokens.npy").unlink()
    stats = prepare(corpus, tokenizers(), vocab, out, num_workers=0, shard_size=3, show_progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert (stats.written_shards, stats.reused_shards) == (1, 2)
    assert after.keys() == before.keys()
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {"shard-000001.tokens.npy", "shard-000001.offsets.npy", "shard-000001.json"}
    assert list(read_shards(out)) == [f"doc-{i:06d}" for i in range(7)]
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind
    with pytest.raises(PrepareError, match="shard_size"):  # resuming with other settings would mix shards
        prepare(corpus, tokenizers(), vocab, out, num_workers=0, shard_size=2, show_progress=False)


def test_bad_documents_are_skipped_and_counted_by_reason(corpus, vocab, tmp_path, capsys):
    root = corpus.parent
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    png = (root / "images/000001.png").read_bytes()
    (root / "images/cut.png").write_bytes(png[: len(png) // 3])
    (root / "audio/junk.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage garbage")
    rows[1]["segments"].append({"type": "image", "path": "images/cut.png"})
    rows[2]["segments"].append({"type": "audio", "path": "audio/junk.wav"})
    rows[3]["segments"] = [{"type": "text", "text": ""}]
    rows[4]["segments"].append({"type": "text", "text": "x" * 300})
    rows[5]["segments"].append({"type": "image", "path": "images/not-there.png"})
    write_jsonl(corpus, rows)
    with pytest.warns(UserWarning, match="row 6"):
        stats = prepare(corpus, tokenizers(), vocab, tmp_path / "out", num_workers=0, shard_size=3,
                        max_doc_tokens=200, show_progress=True)
    skipped = json.loads((tmp_path / "out/skipped.json").read_text())
    expected = {"corrupt_audio": 1, "corrupt_image": 1, "empty": 1, "missing_file": 1, "too_long": 1}
    assert skipped["counts"] == expected == stats.skipped
    assert {d["id"]: d["reason"] for d in skipped["documents"]} == {
        "doc-000001": "corrupt_image", "doc-000002": "corrupt_audio", "doc-000003": "empty",
        "doc-000004": "too_long", "doc-000005": "missing_file"}
    assert list(read_shards(tmp_path / "out")) == ["doc-000000", "doc-000006"]  # nothing else lost
    assert "skipped 5 documents" in capsys.readouterr().out


def test_a_worker_that_dies_stops_prepare_with_an_error_and_keeps_the_finished_shards(tmp_path):
    # multiprocessing.Pool would replace the dead worker and wait forever for its chunk.
    from tests.fakes import KillingText

    docs = [Document(f"d{i}", [TextSegment("POISON" if i == 7 else f"text {i}")]) for i in range(10)]
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="worker process died"):
        prepare(docs, {"text": KillingText(str(tmp_path / "marker"))}, UnifiedVocab(tiny_config()), out,
                num_workers=2, shard_size=5, show_progress=False)
    assert not (out / "manifest.json").exists()
    (tmp_path / "marker").touch()
    stats = prepare(docs, {"text": KillingText(str(tmp_path / "marker"))}, UnifiedVocab(tiny_config()), out,
                    num_workers=2, shard_size=5, show_progress=False)
    assert (stats.documents, stats.reused_shards + stats.written_shards) == (10, 2)
    assert stats.written_shards >= 1  # the poisoned chunk was never written
