"""`mot generate` end to end on a tiny random model with the shipped demo tokenizers: page, PNG, WAV, JSON."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from mot.config import ModalityConfig, RunConfig, TrainConfig, config_to_dict
from mot.generate.cli import add_commands
from mot.model import MoTTransformer
from mot.train.checkpoint import save_checkpoint
from tests.conftest import tiny_config

DEMO_TOKENIZERS = Path(__file__).resolve().parents[1] / "tokenizers" / "demo"
DEMO_MODALITIES = [ModalityConfig("text", 512), ModalityConfig("image", 512), ModalityConfig("speech", 128)]


def _run_folder(root: Path, modalities: list[ModalityConfig]) -> Path:
    """A run folder as the trainer leaves it: checkpoints/step-*, and a copy of the tokenizers."""
    cfg = RunConfig(name="tiny", model=tiny_config(modalities=modalities, max_seq_len=256),
                    train=TrainConfig(seq_len=64, steps=1, warmup_steps=0))
    torch.manual_seed(0)
    model = MoTTransformer(cfg.model)
    run = root / "run"
    save_checkpoint(run / "checkpoints", 1, model.state_dict(), {}, {"config": config_to_dict(cfg)}, keep=1)
    shutil.copytree(DEMO_TOKENIZERS, run / "tokenizers")
    return run


def _media(root: Path) -> tuple[Path, Path]:
    image, audio = root / "in.png", root / "in.wav"
    pixels = np.full((64, 64, 3), 255, dtype=np.uint8)
    pixels[16:48, 8:40] = (220, 30, 30)
    Image.fromarray(pixels).save(image)
    t = np.arange(8000) / 16000
    soundfile.write(audio, 0.3 * np.sin(2 * np.pi * 220 * t), 16000)
    return image, audio


def _mot(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mot")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args, [])


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    return _run_folder(tmp_path_factory.mktemp("gen"), DEMO_MODALITIES)


def test_generate_writes_page_images_speech_and_token_ids(run_folder, tmp_path, capsys):
    image, audio = _media(tmp_path)
    out = tmp_path / "out" / "page.html"
    code = _mot("generate", "--ckpt", str(run_folder), "--prompt", "a red square", "--image", str(image),
                "--audio", str(audio), "--then", "image", "--max-tokens", "70", "--samples", "2",
                "--guidance-scale", "2", "--seed", "3", "--device", "cpu", "--out", str(out))
    assert code == 0, capsys.readouterr().err
    page = out.read_text()
    record = json.loads(out.with_suffix(".json").read_text())
    vocab_specials = {name: record["vocab"]["special_start"] + i
                      for i, name in enumerate(record["vocab"]["special_tokens"])}
    assert len(record["samples"]) == 2
    for i, sample in enumerate(record["samples"], 1):
        prompt, tokens = sample["prompt"], sample["tokens"]
        assert prompt[0] == vocab_specials["<bod>"] and prompt[-1] == vocab_specials["<boi>"]
        assert tokens[64] == vocab_specials["<eoi>"], "an 8x8-code image, then <eoi>"
        png = out.with_name(f"page-sample{i}-image1.png")
        assert Image.open(png).size == (64, 64)
        assert f'src="{png.name}"' in page
    wav = out.with_name("page-prompt-speech1.wav")
    wave, rate = soundfile.read(wav)
    assert rate == 16000 and len(wave) == 25 * 320, "0.5 s of audio is 25 units of 320 samples"
    assert f'<audio controls src="{wav.name}">' in page
    assert Image.open(out.with_name("page-prompt-image1.png")).size == (64, 64)
    assert "a red square" in page


def test_generated_speech_becomes_a_wav_with_a_player(run_folder, tmp_path, capsys):
    out = tmp_path / "speech.html"
    code = _mot("generate", "--ckpt", str(run_folder), "--then", "speech", "--max-tokens", "12",
                "--speech-max-tokens", "8", "--device", "cpu", "--out", str(out))
    assert code == 0, capsys.readouterr().err
    wave, rate = soundfile.read(out.with_name("speech-sample1-speech1.wav"))
    assert rate == 16000 and 320 <= len(wave) <= 8 * 320
    assert '<audio controls src="speech-sample1-speech1.wav">' in out.read_text()


def test_media_the_checkpoint_cannot_read_is_a_clear_error(tmp_path, capsys):
    run = _run_folder(tmp_path, DEMO_MODALITIES[:2])  # text and image only
    _, audio = _media(tmp_path)
    code = _mot("generate", "--ckpt", str(run), "--audio", str(audio), "--out", str(tmp_path / "p.html"))
    assert code == 2
    assert "--audio" in (err := capsys.readouterr().err) and "no speech modality" in err
    code = _mot("generate", "--ckpt", str(run), "--image", str(tmp_path / "missing.png"),
                "--out", str(tmp_path / "p.html"))
    assert code == 2 and "file not found" in capsys.readouterr().err
    code = _mot("generate", "--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "p.html"))
    assert code == 2 and "no checkpoint here" in capsys.readouterr().err
