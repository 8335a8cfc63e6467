"""prepare in two processes (RANK / WORLD_SIZE as torchrun sets them, gloo on the CPU) writes byte for byte what one
process writes, resumes after a process is killed halfway, and its shards read as one corpus."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mot.data.loader import PackedLoader
from mot.data.shards import ShardedCorpus
from mot.vocab import UnifiedVocab
from tests import prepare_worker
from tests.conftest import tiny_config
from tests.test_prepare import make_corpus, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "prepare_worker.py"
WORLD = 2
N_DOCS = 40
POISON_DOC = 28  # position 27 of what the reader yields (it drops doc 5): chunk 27 // 3 = 9, rank 1's fifth
TIMEOUT_S = 90  # for a whole launch; the workers' own watchdog (prepare_worker.WATCHDOG_S) backs it up
GRACE_S = 20  # once one rank has failed, the other is killed after this long (torchrun does the same)
SKIPPED = {"doc-000005": "missing_file", "doc-000014": "corrupt_image", "doc-000020": "too_long"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(corpus: Path, out: Path, marker: Path, logs: Path, workers: int = 0) -> tuple[list[int], dict | None]:
    """Both ranks of one prepare; (exit codes by rank, rank 0's stats or None). Logs go to files, not pipes, so
    a chatty rank cannot block; every rank is dead when this returns."""
    port, procs = _free_port(), []
    logs.mkdir(parents=True, exist_ok=True)
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                  os.environ.get("PYTHONPATH")]))}
        with open(logs / f"rank{rank}.out", "w") as stdout, open(logs / f"rank{rank}.err", "w") as stderr:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(corpus), str(out), str(marker),
                                           "--workers", str(workers)], env=env, cwd=ROOT, stdout=stdout,
                                          stderr=stderr))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):  # one failed: the others get a grace period
                deadline = min(deadline, time.monotonic() + GRACE_S)
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    lines = [line for line in (logs / "rank0.out").read_text().splitlines() if line.startswith(prepare_worker.STATS)]
    stats = json.loads(lines[0][len(prepare_worker.STATS):]) if lines else None
    return codes, stats


def _logs(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def assert_same_output(got: Path, expected: Path) -> None:
    a, b = files(got), files(expected)
    assert sorted(a) == sorted(b)
    for name in ("manifest.json", "skipped.json"):
        assert json.loads(a[name]) == json.loads(b[name]), name
    for name in sorted(b):
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(got / name), np.load(expected / name), err_msg=name)
        assert a[name] == b[name], name  # byte for byte, the shard metadata too


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """40 documents with images and audio; one missing image, one corrupt one, one too long, one poisoned."""
    root = tmp_path_factory.mktemp("corpus")
    rows = make_corpus(root, N_DOCS)
    png = (root / "images/000001.png").read_bytes()
    (root / "images/cut.png").write_bytes(png[: len(png) // 3])
    rows[5]["segments"].append({"type": "image", "path": "images/not-there.png"})
    rows[14]["segments"].append({"type": "image", "path": "images/cut.png"})
    rows[20]["segments"].append({"type": "text", "text": "x" * 300})
    rows[POISON_DOC]["segments"].append({"type": "text", "text": "POISON"})
    write_jsonl(root / "docs.jsonl", rows)
    return root / "docs.jsonl"


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """One process, no workers, uninterrupted (the marker exists, so the poison is harmless)."""
    out = tmp_path_factory.mktemp("one")
    marker = out.parent / "one-marker"
    marker.touch()
    with pytest.warns(UserWarning, match="not-there.png"):
        stats = prepare_worker.run(str(corpus), str(out), str(marker))
    assert stats.skipped == {"corrupt_image": 1, "missing_file": 1, "too_long": 1}
    assert (stats.documents, stats.shards) == (N_DOCS - 3, 13)
    return out


@pytest.fixture(scope="module")
def two_processes(corpus, reference, tmp_path_factory) -> Path:
    out, logs = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("two-logs")
    marker = logs / "marker"
    marker.touch()
    codes, stats = launch(corpus, out, marker, logs)
    assert codes == [0, 0], _logs(logs)
    assert stats is not None and (stats["processes"], stats["shards"], stats["written_shards"]) == (WORLD, 13, 13)
    return out


def test_two_processes_write_what_one_writes(two_processes, reference):
    assert_same_output(two_processes, reference)
    skipped = json.loads((two_processes / "skipped.json").read_text())
    assert {d["id"]: d["reason"] for d in skipped["documents"]} == SKIPPED


def test_a_killed_multi_process_prepare_resumes_to_the_uninterrupted_output(corpus, reference, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "marker"
    codes, stats = launch(corpus, out, marker, tmp_path / "logs-killed")
    assert codes[1] == -signal.SIGKILL and codes[0] != 0 and stats is None, _logs(tmp_path / "logs-killed")
    assert not (out / "manifest.json").exists()
    complete = {p.name.split(".")[0] for p in out.glob("shard-*.json")}
    assert {f"shard-{i:06d}" for i in (1, 3, 5, 7)} <= complete and "shard-000009" not in complete

    marker.touch()
    codes, stats = launch(corpus, out, marker, tmp_path / "logs-resumed", workers=2)
    assert codes == [0, 0], _logs(tmp_path / "logs-resumed")
    assert stats["reused_shards"] >= 4 and stats["written_shards"] >= 1
    assert stats["reused_shards"] + stats["written_shards"] == stats["shards"] == 13
    assert_same_output(out, reference)


def test_shards_of_two_processes_read_as_one_corpus(two_processes, reference):
    vocab = UnifiedVocab(tiny_config())
    corpus = ShardedCorpus(two_processes)
    assert corpus.ids == [f"doc-{i:06d}" for i in range(N_DOCS) if f"doc-{i:06d}" not in SKIPPED]
    seq_len, batch = 32, 2
    whole = PackedLoader(corpus, vocab, batch, seq_len, seed=3)
    single = PackedLoader(reference, vocab, batch, seq_len, seed=3)
    steps = whole.tokens_per_epoch // (batch * seq_len) + 3  # into the second epoch
    for step in range(steps):
        x, y = next(whole), next(single)
        for field in ("tokens", "modality", "positions", "document_ids"):
            assert torch.equal(getattr(x, field), getattr(y, field)), (step, field)

    ranks = [PackedLoader(corpus, vocab, batch, seq_len, seed=3, rank=r, world_size=WORLD) for r in range(WORLD)]
    for epoch in (0, 1):
        order = whole.epoch_order(epoch)
        for r, loader in enumerate(ranks):  # each rank reads every WORLD-th document of the one shuffled order
            np.testing.assert_array_equal(loader.epoch_order(epoch), order[r::WORLD])
        interleaved = np.empty_like(order)
        for r, loader in enumerate(ranks):
            interleaved[r::WORLD] = loader.epoch_order(epoch)
        np.testing.assert_array_equal(interleaved, order)
        assert sorted(order) == list(range(len(corpus)))
    for loader in ranks:  # and its batches are those documents' tokens back to back
        n = loader.tokens_per_epoch // (batch * seq_len) + 2
        tokens = torch.cat([next(loader).tokens.reshape(-1) for _ in range(n)]).numpy()
        stream = np.concatenate([np.asarray(corpus.document(i)) for e in (0, 1) for i in loader.epoch_order(e)])
        np.testing.assert_array_equal(tokens, stream[: len(tokens)])


def test_a_failure_of_process_0_before_the_work_reaches_the_other_process(corpus, tmp_path):
    out = tmp_path / "a-file"  # not a folder: process 0's check fails with FileExistsError, not a PrepareError
    out.write_text("")
    codes, stats = launch(corpus, out, tmp_path / "marker", tmp_path / "logs")
    logs = _logs(tmp_path / "logs")
    # Rank 1 raises at once with rank 0's message, instead of waiting in a collective until it is killed (-9).
    assert codes[0] == 1 and codes[1] == 1 and stats is None, (codes, logs)
    assert "process 0 failed: FileExistsError" in (tmp_path / "logs" / "rank1.err").read_text(), logs


def test_two_processes_on_tar_shards_write_what_one_writes(tmp_path):
    """Each process's workers scan every tar (document ids) and decode only the documents of its own chunks."""
    from tests.test_sources import _tar_corpus

    _tar_corpus(tmp_path / "tars")
    marker = tmp_path / "marker"
    marker.touch()
    with pytest.warns(UserWarning, match="s/009"):
        prepare_worker.run(str(tmp_path / "tars"), str(tmp_path / "one"), str(marker))
    codes, stats = launch(tmp_path / "tars", tmp_path / "two", marker, tmp_path / "logs", workers=2)
    assert codes == [0, 0], _logs(tmp_path / "logs")
    assert (stats["processes"], stats["written_shards"], stats["skipped"]) == (
        WORLD, 12, {"corrupt_audio": 2, "corrupt_image": 2, "missing_caption": 1})
    assert_same_output(tmp_path / "two", tmp_path / "one")
