"""bench/prepare.py --smoke: it reports positive rates, and the shards it timed hold each document's exact ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mot.data.encode import DocumentEncoder
from mot.data.shards import ShardedCorpus
from mot.data.sources import open_documents
from mot.tokenize.load import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[str, dict]:
    work = tmp_path_factory.mktemp("bench_prepare")
    out = work / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "prepare.py"), "--smoke", "--out-dir", str(work),
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_smoke_prints_tables_and_positive_rates(smoke):
    stdout, results = smoke
    assert set(results["cases"]) == {"demo", "chameleon"}
    for case, r in results["cases"].items():
        assert f"=== {case}:" in stdout
        assert r["documents"] > 0 and r["data"]["samples"] > 0
        assert r["decode"]["pool_images_per_s"]["median"] > 0 and r["decode"]["single_images_per_s"]["median"] > 0
        assert r["encoder"] and all(e["images_per_s"]["median"] > 0 for e in r["encoder"])
        assert r["flops"]["encoder"] > 0 and r["flops"]["quantizer"] > 0
        for run in r["pipeline"]:
            assert run["tokens_per_s"] > 0 and run["documents_per_s"] > 0 and run["images_per_s"] > 0
            assert run["documents"] == r["documents"] and not run["skipped"], run["skipped"]
            assert run["bound"]
    for header in ("decode (CPU)", "encoder alone", "prepare end to end", "tokens/s", "bound:", "total"):
        assert header in stdout
    # the chameleon VQGAN at the smoke's 64 px: 4 x 4 codes
    assert results["cases"]["chameleon"]["options"]["image_resolution"] == 64
    audio = results["cases"]["demo"]["data"]["audio"]
    assert audio > 0 or "no audio" in stdout


@pytest.mark.parametrize("case", ["demo", "chameleon"])
def test_shards_hold_what_the_document_encoder_gives(smoke, case):
    """prepare's workers encode in batches; DocumentEncoder encodes one document on the CPU: same ids."""
    _, results = smoke
    r = results["cases"][case]
    corpus = ShardedCorpus(r["shards_dir"])
    manifest = corpus.manifest
    assert manifest["documents"] == r["documents"] == len(corpus)
    tokenizers = {name: load_tokenizer(name, info["path"]) for name, info in manifest["tokenizers"].items()}
    options = {k: manifest["options"][k] for k in ("max_doc_tokens", "image_resolution", "sample_rate",
                                                    "image_policy")}
    assert options["image_resolution"] == r["options"]["image_resolution"]
    encoder = DocumentEncoder(tokenizers, manifest["vocab"], **options)
    docs = {d.id: d for d in open_documents(r["data_dir"])}
    assert set(docs) == set(corpus.ids)
    index = {doc_id: i for i, doc_id in enumerate(corpus.ids)}
    picked = corpus.ids[:2] + corpus.ids[-1:] + [i for i in corpus.ids if "audio" in i][:2]
    specials = manifest["special_ids"]
    for doc_id in picked:
        expected = encoder.encode(docs[doc_id])
        got = np.asarray(corpus.document(index[doc_id]))
        np.testing.assert_array_equal(got, expected, err_msg=doc_id)
        assert got[0] == specials["<bod>"] and got[-1] == specials["<eod>"]
        assert specials["<boi>"] in got or specials["<bos>"] in got
    if case == "demo" and audio_in(r):
        assert any("audio" in i for i in picked)


def audio_in(r: dict) -> bool:
    return r["data"]["audio"] > 0
