"""Tiny stand-ins for the real tokenizers: they implement the ModalityTokenizer protocol and nothing more."""

from __future__ import annotations

import os
import signal

import torch


class FakeText:
    modality = "text"
    vocab_size = 40

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode()), dtype=torch.long) % self.vocab_size

    def decode(self, ids):
        return bytes(ids.tolist()).decode(errors="replace")

    def save(self, folder) -> None:
        pass


class FakeImage:
    """Mean colour of each 4x4 patch, quantized: a 16x16 image is a 4x4 grid of codes."""

    modality = "image"
    vocab_size = 24
    grid_size = 4
    resolution = 16

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        patches = image.mean(0).unfold(0, 4, 4).unfold(1, 4, 4).mean((-1, -2))  # (4, 4), row-major below
        return (patches * (self.vocab_size - 1)).round().long().reshape(-1)

    def decode(self, ids):
        return ids.float().reshape(1, 4, 4) / (self.vocab_size - 1)

    def save(self, folder) -> None:
        pass


class FakeSpeech:
    """RMS energy of 80-sample frames, quantized."""

    modality = "speech"
    vocab_size = 16
    sample_rate = 8000

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        frames = wave[: len(wave) // 80 * 80].reshape(-1, 80)
        return (frames.pow(2).mean(1).sqrt() * 2 * self.vocab_size).long().clamp(0, self.vocab_size - 1)

    def decode(self, ids):
        return ids.float().repeat_interleave(80)

    def save(self, folder) -> None:
        pass


class KillingText(FakeText):
    """FakeText that SIGKILLs its own process when it meets `poison` in a text, unless the file `marker` exists:
    a prepare process dying mid-run, as under the OOM killer. Picklable (plain attributes)."""

    def __init__(self, marker: str, poison: str = "POISON"):
        self.marker, self.poison = str(marker), poison

    def encode(self, text: str) -> torch.Tensor:
        if self.poison in text and not os.path.exists(self.marker):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode(text)
