"""Helpers for tests that train: a tiny 3-modality corpus, a tiny run config, a recipe file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from mot.config import DataConfig, RunConfig, TrainConfig, config_to_dict
from mot.data.documents import AudioSegment, Document, ImageSegment, TextSegment
from mot.data.prepare import prepare
from mot.vocab import UnifiedVocab
from tests.conftest import tiny_config
from tests.fakes import FakeImage, FakeSpeech, FakeText


def make_shards(out: Path) -> Path:
    """60 documents mixing text, 16x16 images (16 codes each) and short waveforms."""
    rng = np.random.default_rng(0)
    docs = []
    for i in range(60):
        segments = [TextSegment("".join(chr(97 + c) for c in rng.integers(0, 26, 4 + i % 9)))]
        if i % 3 != 2:
            segments.append(ImageSegment(data=rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
        if i % 2:
            segments.append(AudioSegment(data=rng.normal(0, 0.3, 80 * (5 + i % 7)).astype(np.float32),
                                         sample_rate=8000))
        docs.append(Document(f"doc-{i:03d}", segments))
    prepare(docs, {"text": FakeText(), "image": FakeImage(), "speech": FakeSpeech()},
            UnifiedVocab(tiny_config()), out, num_workers=0, shard_size=16, show_progress=False)
    return out


def run_config(shards: Path, out_dir: Path, **train) -> RunConfig:
    base = TrainConfig(seq_len=32, batch_size=4, steps=8, lr=3e-3, warmup_steps=2, log_every=1, eval_every=4,
                       eval_batches=2, checkpoint_every=4, keep_checkpoints=2, tensorboard=False,
                       out_dir=str(out_dir))
    return RunConfig(name="tiny", model=tiny_config(), train=dataclasses.replace(base, **train),
                     data=DataConfig(shards=str(shards), eval_fraction=0.1))


def write_recipe(path: Path, cfg: RunConfig) -> None:
    """The config as a TOML recipe (JSON scalars and lists are valid TOML values)."""
    data = config_to_dict(cfg)
    lines = [f"name = {json.dumps(data['name'])}"]
    for table in ("train", "data"):
        lines.append(f"[{table}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in data[table].items()]
    lines.append("[model]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in data["model"].items() if k != "modalities"]
    for mod in data["model"]["modalities"]:
        lines.append("[[model.modalities]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in mod.items()]
    path.write_text("\n".join(lines) + "\n")
