"""A synthetic corpus read by prepare's workers (mot/data/synthetic_source.py) gives the shards that its tars,
written by write_shards and read back, give."""

from __future__ import annotations

import json

import pytest

from mot.data.documents import DocumentSourceError
from mot.data.prepare import prepare
from mot.data.sources import open_documents
from mot.data.synthetic_docs import members_of, write_shards
from mot.data.synthetic_source import SyntheticDocuments
from mot.vocab import UnifiedVocab
from tests.conftest import tiny_config
from tests.fakes import FakeImage, FakeSpeech, FakeText


def _outputs(folder) -> dict[str, object]:
    out = {}
    for path in sorted(folder.iterdir()):
        if path.name == "manifest.json":
            manifest = json.loads(path.read_text())
            manifest.pop("source")  # names the tars, or the synthetic spec
            out[path.name] = manifest
        else:
            out[path.name] = path.read_bytes()
    return out


@pytest.mark.parametrize(("kind", "options", "workers"), [
    ("demo", {"audio_fraction": 0.3}, 0),
    ("scenes", {"audio_fraction": 0.3, "speech_max_words": 12}, 2),
])
def test_a_synthetic_source_prepares_to_the_shards_of_its_tars(tmp_path, kind, options, workers):
    tokenizers = {"text": FakeText(), "image": FakeImage(), "speech": FakeSpeech()}
    vocab = UnifiedVocab(tiny_config())
    write_shards(kind, tmp_path / "tars", samples=24, per_tar=10, seed=4, **options)
    source = SyntheticDocuments(kind, samples=24, per_part=10, seed=4, **options)
    assert [p.size for p in source.parts()] == [10, 10, 4]
    for name, data in (("from_tars", tmp_path / "tars"), ("synthetic", source)):
        prepare(data, tokenizers, vocab, tmp_path / name, num_workers=workers, shard_size=16, show_progress=False)
    tars, synthetic = _outputs(tmp_path / "from_tars"), _outputs(tmp_path / "synthetic")
    assert list(synthetic) == list(tars) and synthetic == tars
    documents = synthetic["manifest.json"]["documents"]
    assert documents >= 48 and abs(documents - source.size_hint()) <= 24  # image pairs, some audio pairs


@pytest.mark.parametrize(("spec", "message"), [
    ("synthetic:demo?seed=1", "needs samples=N"),
    ("synthetic:photos?samples=3", "kind 'photos': choose from"),
    ("synthetic:demo?samples=many", "samples='many' is not an integer"),
    ("synthetic:demo?samples=3&colour=red", r"unknown option\(s\) \['colour'\]"),
    ("synthetic:scenes?samples=3&icon_dir=/no/such/theme", "no usable PNG icons"),
    ("synthetic:demo?samples=0", "must be positive"),
])
def test_a_bad_synthetic_spec_names_what_is_wrong(spec, message):
    with pytest.raises(DocumentSourceError, match=message):
        open_documents(spec)


def test_a_spec_gives_the_source_its_options():
    source = open_documents("synthetic:scenes?samples=30&per_part=8&seed=2&audio_fraction=0.5&speech_max_words=10")
    assert isinstance(source, SyntheticDocuments) and len(source.parts()) == 4
    task = source.parts()[0].task
    assert (task["kind"], task["seed"], task["audio_fraction"], task["speech_max_words"]) == ("scenes", 2, 0.5, 10)


@pytest.mark.parametrize(("kind", "options"), [
    ("demo", {"audio_fraction": 0.0}),
    ("scenes", {"audio_fraction": 0.0}),
    ("scenes", {"audio_fraction": 0.5, "speech_max_words": 6}),
    ("scenes", {"audio_fraction": 0.5, "speech_max_words": 6, "pair_orders": ("text-media",)}),
    ("chameleon", {"min_side": 40, "max_side": 60}),
])
def test_a_part_knows_its_ids_without_making_its_samples(kind, options, monkeypatch):
    """A prepare of several processes scans every part in each of them; for such parts the scan makes nothing."""
    from mot.data import synthetic_source
    from mot.data.pipeline_worker import _scan

    source = SyntheticDocuments(kind, samples=12, per_part=5, seed=3, **options)
    made = []

    def counted(*args):
        made.append(args)
        return members_of(*args)

    for number, part in enumerate(source.parts()):
        read = [doc.id for doc in part.read(lambda *a: pytest.fail(f"skipped {a}"))]
        assert part.ids_without_reading() == read and len(read) >= len(source.pair_orders) * part.size
        monkeypatch.setattr(synthetic_source, "members_of", counted)
        assert _scan(number, part).ids == read and made == []
        monkeypatch.undo()
    if kind == "scenes" and options["audio_fraction"] > 0:
        assert sum("audio" in i for p in source.parts() for i in p.ids_without_reading()) > 0
    demo_audio = SyntheticDocuments("demo", samples=4, audio_fraction=0.5)  # draws its audio after its image
    assert all(part.ids_without_reading() is None for part in demo_audio.parts())


@pytest.mark.parametrize("audio_fraction", [0.0, 0.4])
def test_two_processes_prepare_a_synthetic_source_as_one_does(tmp_path, audio_fraction):
    from tests import prepare_worker
    from tests.test_prepare_distributed import _logs, assert_same_output, launch

    spec = f"synthetic:scenes?samples=14&seed=5&audio_fraction={audio_fraction}&speech_max_words=8"
    marker = tmp_path / "marker"
    marker.touch()
    prepare_worker.run(spec, str(tmp_path / "one"), str(marker))
    codes, stats = launch(spec, tmp_path / "two", marker, tmp_path / "logs", workers=2)
    assert codes == [0, 0], _logs(tmp_path / "logs")
    assert stats["processes"] == 2 and stats["documents"] + sum(stats["skipped"].values()) >= 28
    assert_same_output(tmp_path / "two", tmp_path / "one")
