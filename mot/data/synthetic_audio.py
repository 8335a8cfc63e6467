"""Speech-like audio for synthetic corpora, and WAV bytes: harmonics on a wandering pitch with a syllable-rate
envelope (no speech engine needed). Used by synthetic_docs (tar shards) and scenes (the scaling corpus)."""

from __future__ import annotations

import io
import wave

import numpy as np

SAMPLE_RATE = 16_000


def speech_like(rng: np.random.Generator, seconds: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """int16 mono: 8 harmonics of a pitch that wanders around 100-220 Hz, syllables at 3-6 Hz, breath noise."""
    n = int(seconds * sample_rate)
    t = np.arange(n, dtype=np.float64) / sample_rate
    f0 = rng.uniform(100, 220) * (1 + 0.12 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * t + rng.uniform(0, 6.3)))
    f0 *= np.exp(np.cumsum(rng.normal(0, 2e-4, n)))  # slow random drift
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    gains = rng.uniform(0.3, 1.0, 8) / np.arange(1, 9)
    voiced = sum(g * np.sin((k + 1) * phase) for k, g in enumerate(gains))
    syllables = np.abs(np.sin(np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 3.1))) ** 0.7
    envelope = syllables * np.clip(np.minimum(t, seconds - t) * 20, 0, 1)  # 50 ms fades
    wave_ = voiced * envelope + rng.normal(0, 0.03, n) * (1 - 0.7 * syllables)
    wave_ *= 0.8 / max(1e-6, np.abs(wave_).max())
    return (wave_ * 32767).astype(np.int16)


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit mono WAV file (stdlib `wave`: no soundfile needed)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(np.ascontiguousarray(samples, dtype="<i2").tobytes())
    return buf.getvalue()
