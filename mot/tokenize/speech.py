"""Speech units: a waveform <-> one discrete unit per fixed-length frame, decodable to audio.

Features are log-mel frames: `torchaudio.transforms.MelSpectrogram` with power=1 (a magnitude
mel spectrogram, not power), in dB (20 log10, floored at `floor_db`), normalised by a mean and
std measured on the training audio. A codebook learned by k-means (`mot.tokenize.speech_codebook`) on
those frames turns every frame (or `frames_per_unit` stacked neighbouring frames) into a unit.

Rate: one unit per `hop_length * frames_per_unit` samples, e.g. 16 kHz / 320 = 50 units/s.
A waveform of T samples gives T // (hop_length * frames_per_unit) units (the trailing part
shorter than one unit is dropped), and decoding n units gives n * hop_length * frames_per_unit
samples. Decoding maps units to their codebook frames, undoes the normalisation and the dB, and
inverts the mel spectrogram: least squares back to a linear spectrogram (a truncated pseudo-inverse
of the mel filterbank), then Griffin-Lim phase recovery. A way to listen, not a vocoder: expect
robotic, phasey speech. The error metric, `mel_reconstruction_error`, lives in speech_metrics.

    tok = SpeechTokenizer.train(["a.wav", "b.wav"], load_speech_config("tokenizers/speech_demo.toml"))
    units = tok.encode_file("c.wav")          # int64 (n,), values in [0, n_units)
    audio = tok.decode(units)                  # float (n * 320,), in [-1, 1], at config.sample_rate
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile
import torch
import torchaudio
from einops import rearrange
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mot.tokenize.base import TokenizerError, config_to_toml, load_tokenizer_config, write_atomic
from mot.tokenize.speech_codebook import assign, kmeans

WEIGHTS_FILE = "speech_units.safetensors"
CONFIG_FILE = "speech_units.toml"
__all__ = ["SpeechTokenizer", "SpeechTokenizerConfig", "load_audio", "load_speech_config"]
PEAK_TOLERANCE = 1.001  # a float waveform must lie in [-1, 1]; this much over is rounding, not a format error


@dataclass
class SpeechTokenizerConfig:
    # --- features: log-mel frames at sample_rate / hop_length frames per second
    sample_rate: int = 16000
    n_fft: int = 640  # 40 ms window at 16 kHz
    win_length: int = 0  # 0 = n_fft
    hop_length: int = 320  # 16000 / 320 = 50 frames/s
    frames_per_unit: int = 1  # 2 = one unit per two stacked neighbouring frames (the unit rate halves)
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 0.0  # 0 = sample_rate / 2
    floor_db: float = -40.0  # log-mel values (20 log10 of the magnitude mel) are clamped here: silence
    normalization: Literal["bin", "global"] = "bin"  # mean/std per mel bin, or one mean/std over all bins
    # --- codebook: k-means over the normalised training frames
    n_units: int = 128
    kmeans_iters: int = 50  # Lloyd iterations (kmeans_batch_size = 0) or mini-batch steps
    kmeans_batch_size: int = 0  # 0 = full batch (Lloyd); > 0 = mini-batch k-means
    kmeans_seed: int = 0
    max_train_frames: int = 0  # k-means on a seeded random subset of this many units; 0 = all
    # --- decoding
    griffin_lim_iters: int = 32
    griffin_lim_momentum: float = 0.99

    @property
    def samples_per_unit(self) -> int:
        return self.hop_length * self.frames_per_unit

    @property
    def unit_rate(self) -> float:
        """Units per second."""
        return self.sample_rate / self.samples_per_unit

    @property
    def unit_dim(self) -> int:
        return self.frames_per_unit * self.n_mels

    def check(self, where: str = "SpeechTokenizerConfig") -> SpeechTokenizerConfig:
        def fail(key: str, why: str):
            raise TokenizerError(f"{where}: '{key}' {why}")

        for key in ("sample_rate", "n_fft", "hop_length", "frames_per_unit", "n_mels", "n_units", "kmeans_iters",
                    "griffin_lim_iters"):
            if getattr(self, key) <= 0:
                fail(key, f"must be positive, got {getattr(self, key)}")
        for key in ("win_length", "kmeans_batch_size", "max_train_frames"):
            if getattr(self, key) < 0:
                fail(key, f"must be >= 0, got {getattr(self, key)}")
        if self.win_length > self.n_fft:
            fail("win_length", f"({self.win_length}) must not exceed n_fft ({self.n_fft})")
        if self.hop_length > (self.win_length or self.n_fft):
            fail("hop_length", f"({self.hop_length}) must not exceed the window ({self.win_length or self.n_fft}): "
                               "Griffin-Lim cannot fill gaps between frames")
        nyquist = self.sample_rate / 2
        f_max = self.f_max or nyquist
        if not 0 <= self.f_min < f_max <= nyquist:
            fail("f_min/f_max", f"need 0 <= f_min < f_max <= sample_rate / 2 = {nyquist}, got {self.f_min}/{f_max}")
        if self.max_train_frames and self.max_train_frames < self.n_units:
            fail("max_train_frames", f"({self.max_train_frames}) must be 0 or at least n_units ({self.n_units})")
        if not 0 <= self.griffin_lim_momentum < 1:
            fail("griffin_lim_momentum", f"must be in [0, 1), got {self.griffin_lim_momentum}")
        return self


def load_speech_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SpeechTokenizerConfig:
    """A SpeechTokenizerConfig from TOML (e.g. tokenizers/speech_demo.toml), every key checked."""
    return load_tokenizer_config(SpeechTokenizerConfig, path, overrides)


# ---------------------------------------------------------------- audio in


def load_audio(path: str | Path, sample_rate: int, resample: bool = True) -> torch.Tensor:
    """A sound file -> mono float32 (T,) at sample_rate (channels averaged; resampled unless resample=False)."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: audio file not found")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise TokenizerError(f"{path}: not a readable audio file ({err})") from None
    if data.size == 0:
        raise TokenizerError(f"{path}: holds no audio samples")
    waveform = torch.from_numpy(data).mean(1)  # (T, C) -> mono
    if rate != sample_rate:
        if not resample:
            raise TokenizerError(f"{path}: sample rate {rate} Hz, expected {sample_rate} Hz (pass resample=True)")
        waveform = torchaudio.functional.resample(waveform, rate, sample_rate)
    return waveform.clamp(-1, 1)


def check_waveform(waveform, min_samples: int, where: str = "waveform") -> torch.Tensor:
    """A mono float waveform (T,) in [-1, 1] of at least min_samples samples, or a TokenizerError saying why not."""
    if isinstance(waveform, np.ndarray):
        waveform = torch.from_numpy(waveform)
    if not isinstance(waveform, torch.Tensor):
        raise TokenizerError(f"{where}: expected a waveform tensor (T,) or an audio file path, got {type(waveform)}")
    if not waveform.is_floating_point():
        raise TokenizerError(f"{where}: {waveform.dtype} samples; expected float in [-1, 1] "
                             "(int16 PCM: divide by 32768)")
    if waveform.ndim == 2 and waveform.shape[0] == 1:
        waveform = waveform[0]
    if waveform.ndim != 1:
        raise TokenizerError(f"{where}: expected a mono waveform of shape (T,), got shape {tuple(waveform.shape)} "
                             "(mix channels down first, e.g. x.mean(0), or use encode_file)")
    if waveform.numel() < min_samples:
        what = "is empty" if waveform.numel() == 0 else f"has {waveform.numel()} samples"
        raise TokenizerError(f"{where}: {what}; one speech unit needs {min_samples} samples")
    if not torch.isfinite(waveform).all():
        raise TokenizerError(f"{where}: contains NaN or infinite samples")
    peak = float(waveform.abs().max())
    if peak > PEAK_TOLERANCE:
        raise TokenizerError(f"{where}: peak amplitude {peak:.3g}; expected float samples in [-1, 1]")
    return waveform.float()


# ---------------------------------------------------------------- the tokenizer


class SpeechTokenizer:
    """Log-mel frames quantized by a k-means codebook, behind the ModalityTokenizer protocol."""

    modality = "speech"

    def __init__(self, config: SpeechTokenizerConfig, codebook: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        self.config = c = config.check()
        shapes = {"codebook": (c.n_units, c.unit_dim), "mean": (c.n_mels,), "std": (c.n_mels,)}
        for name, tensor in (("codebook", codebook), ("mean", mean), ("std", std)):
            if tuple(tensor.shape) != shapes[name]:
                raise TokenizerError(f"{name} has shape {tuple(tensor.shape)}, the config needs {shapes[name]}")
        self.codebook, self.mean, self.std = codebook.float(), mean.float(), std.float()
        win = c.win_length or c.n_fft
        f_max = c.f_max or c.sample_rate / 2
        self.mel = torchaudio.transforms.MelSpectrogram(c.sample_rate, c.n_fft, win, c.hop_length, c.f_min, f_max,
                                                        n_mels=c.n_mels, power=1.0)
        # Least-squares mel inversion through a truncated pseudo-inverse of the filterbank. InverseMelScale solves
        # the same problem with lstsq, which fails or blows up when low mel filters outnumber the FFT bins under
        # them (n_mels=128, n_fft=640: 9.5 dB end-to-end error against 3.6 dB here).
        self.mel_pinv = torch.linalg.pinv(self.mel.mel_scale.fb.T, rtol=1e-3)  # (n_fft // 2 + 1, n_mels)
        self.window = torch.hann_window(win)  # MelSpectrogram's default window, reused by Griffin-Lim
        self.train_stats: dict = {}

    @property
    def vocab_size(self) -> int:
        return self.config.n_units

    # -- features

    def log_mel(self, item, where: str = "waveform") -> torch.Tensor:
        """Waveform (T,) or audio file -> log-mel in dB (n_frames, n_mels), n_frames a multiple of frames_per_unit."""
        c = self.config
        if isinstance(item, str | Path):
            item, where = load_audio(item, c.sample_rate), str(item)
        waveform = check_waveform(item, c.samples_per_unit, where)
        n_frames = waveform.numel() // c.samples_per_unit * c.frames_per_unit
        mel = self.mel(waveform)[:, :n_frames]  # centred frames: frame i is centred on sample i * hop
        return 20 * torch.log10(mel.clamp_min(10 ** (c.floor_db / 20))).T

    def normalize(self, log_mel: torch.Tensor) -> torch.Tensor:
        """Log-mel (n_frames, n_mels) dB -> normalised unit vectors (n_frames / frames_per_unit, unit_dim)."""
        z = (log_mel - self.mean) / self.std
        return rearrange(z, "(n s) m -> n (s m)", s=self.config.frames_per_unit)

    def units_to_log_mel(self, units: torch.Tensor) -> torch.Tensor:
        """Units (n,) -> their codebook frames as log-mel in dB (n * frames_per_unit, n_mels)."""
        z = rearrange(self.codebook[self._check_units(units)], "n (s m) -> (n s) m", s=self.config.frames_per_unit)
        return z * self.std + self.mean

    def log_mel_to_waveform(self, log_mel: torch.Tensor) -> torch.Tensor:
        """Log-mel dB (n_frames, n_mels) -> waveform (n_frames * hop_length,) in [-1, 1] by mel inversion."""
        c = self.config
        magnitude = torch.relu(self.mel_pinv @ 10 ** (log_mel.T / 20))  # (freq, n_frames), no negative magnitudes
        # centred STFT: n_frames * hop samples span n_frames + 1 frames; repeat the last one
        magnitude = torch.cat([magnitude, magnitude[:, -1:]], 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # Griffin-Lim starts from random phases: same units, same audio
            audio = torchaudio.functional.griffinlim(
                magnitude, self.window, c.n_fft, c.hop_length, len(self.window), power=1.0, n_iter=c.griffin_lim_iters,
                momentum=c.griffin_lim_momentum, length=log_mel.shape[0] * c.hop_length, rand_init=True)
        peak = float(audio.abs().max()) if audio.numel() else 0.0
        return audio / peak if peak > 1 else audio  # scale down, never clip

    # -- protocol

    def encode(self, item, sample_rate: int | None = None) -> torch.Tensor:
        """A waveform (T,) float in [-1, 1] at config.sample_rate, or an audio file path -> units (n,) int64."""
        if isinstance(item, str | Path):
            return self.encode_file(item)
        if sample_rate is not None and sample_rate != self.config.sample_rate:
            raise TokenizerError(f"waveform at {sample_rate} Hz, the tokenizer expects {self.config.sample_rate} Hz "
                                 "(resample with torchaudio.functional.resample, or use encode_file)")
        return self.units_from_log_mel(self.log_mel(item))

    def encode_file(self, path: str | Path) -> torch.Tensor:
        """Read with soundfile, downmix to mono, resample to config.sample_rate, encode."""
        return self.units_from_log_mel(self.log_mel(Path(path)))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Units (n,) -> waveform (n * samples_per_unit,) float32 in [-1, 1] at config.sample_rate."""
        return self.log_mel_to_waveform(self.units_to_log_mel(ids))

    def units_from_log_mel(self, log_mel: torch.Tensor) -> torch.Tensor:
        """Log-mel dB (n_frames, n_mels) -> the nearest codebook entry of each unit, (n_frames / frames_per_unit,)."""
        return self.units_from_features(self.normalize(log_mel))

    def features(self, item, where: str = "waveform") -> torch.Tensor:
        """Waveform (T,) or audio file -> normalised unit vectors (n, unit_dim): what `encode` quantizes.

        `mot prepare` computes these in its CPU workers and quantizes whole batches on the GPU."""
        return self.normalize(self.log_mel(item, where))

    def units_from_features(self, features: torch.Tensor, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """Unit vectors (n, unit_dim) -> the nearest codebook entry of each (n,) int64 (codebook: a copy on the
        features' device, default this tokenizer's)."""
        return assign(features, self.codebook if codebook is None else codebook)[0]

    def _check_units(self, units) -> torch.Tensor:
        units = torch.as_tensor(units)
        if units.is_floating_point() or units.dtype == torch.bool or units.ndim != 1:
            raise TokenizerError(f"units must be a 1-D integer tensor, got {units.dtype} of shape {tuple(units.shape)}")
        if units.numel() == 0:
            raise TokenizerError("units are empty: nothing to decode")
        low, high = int(units.min()), int(units.max())
        if low < 0 or high >= self.vocab_size:
            raise TokenizerError(f"units must be in [0, {self.vocab_size}), got values in [{low}, {high}]")
        return units.long()

    # -- files

    def save(self, folder: str | Path) -> None:
        """folder/speech_units.safetensors (codebook, mean, std) + folder/speech_units.toml, written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {"codebook": self.codebook, "mean": self.mean, "std": self.std}
        state = {k: v.contiguous() for k, v in state.items()}
        meta = {"format": "mot-speech-units"}
        write_atomic(folder / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata=meta))
        text = config_to_toml(self.config)
        write_atomic(folder / CONFIG_FILE, lambda p: p.write_text(text))

    @classmethod
    def load(cls, folder: str | Path) -> SpeechTokenizer:
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise TokenizerError(f"{folder / name}: not found (a speech tokenizer folder holds "
                                     f"{CONFIG_FILE} and {WEIGHTS_FILE}, written by SpeechTokenizer.save)")
        config = load_speech_config(folder / CONFIG_FILE)
        try:
            state = load_file(str(folder / WEIGHTS_FILE))
        except (SafetensorError, OSError) as err:
            raise TokenizerError(f"{folder / WEIGHTS_FILE}: not a readable safetensors file: {err}") from None
        missing = sorted({"codebook", "mean", "std"} - set(state))
        if missing:
            raise TokenizerError(f"{folder / WEIGHTS_FILE}: missing tensors {missing}")
        try:
            return cls(config, state["codebook"], state["mean"], state["std"])
        except TokenizerError as err:
            raise TokenizerError(f"{folder / WEIGHTS_FILE}: {err}") from None

    @classmethod
    def train(cls, waveforms_or_paths: Iterable, config: SpeechTokenizerConfig,
              show_progress: bool = True) -> SpeechTokenizer:
        """Measure the normalisation and learn the codebook on training audio (tensors (T,) or file paths).

        An unreadable or unusable file is skipped with a warning and listed in `train_stats["skipped"]`;
        a bad tensor is an error.
        """
        config.check()
        c = config
        tok = cls(config, torch.zeros(c.n_units, c.unit_dim), torch.zeros(c.n_mels), torch.ones(c.n_mels))
        frames, skipped = [], []
        for item in tqdm(list(waveforms_or_paths), desc="speech log-mel", disable=not show_progress, leave=False):
            if isinstance(item, str | Path):
                try:
                    frames.append(tok.log_mel(item))
                except TokenizerError as err:
                    warnings.warn(f"skipping {err}", stacklevel=2)
                    skipped.append(str(err))
            else:
                frames.append(tok.log_mel(item))
        if not frames:
            raise TokenizerError(f"no usable training audio ({len(skipped)} skipped)")
        every = torch.cat(frames)
        if c.normalization == "bin":
            tok.mean, tok.std = every.mean(0), every.std(0).clamp_min(1e-3)
        else:
            tok.mean = every.mean().repeat(c.n_mels)
            tok.std = every.std().clamp_min(1e-3).repeat(c.n_mels)
        x = torch.cat([tok.normalize(f) for f in frames])
        if len(x) < c.n_units:
            raise TokenizerError(f"{len(x)} training units (of {1 / c.unit_rate:.3g} s each) for a codebook of "
                                 f"{c.n_units}: give more audio or lower n_units")
        if c.max_train_frames and len(x) > c.max_train_frames:
            pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(c.kmeans_seed))
            x = x[pick[: c.max_train_frames]]
        tok.codebook, history = kmeans(x, c.n_units, c.kmeans_iters, c.kmeans_seed, c.kmeans_batch_size,
                                       show_progress=show_progress)
        tok.train_stats = {"items": len(frames), "skipped": skipped, "units": len(x), "inertia": history}
        return tok
