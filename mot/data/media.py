"""Decoding a document's images and audio into what the tokenizers take.

Images: RGB, resized so the shorter side matches the resolution and centre-cropped (taming-transformers'
preprocessing), as a (3, H, W) float tensor in [0, 1]. Audio: mono (channels averaged), resampled with
`torchaudio.functional.resample` when the rate differs, as a (T,) float tensor. A file that cannot be
decoded raises `BadInput`, which prepare counts by its reason instead of failing.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

CORRUPT_IMAGE = "corrupt_image"
CORRUPT_AUDIO = "corrupt_audio"
MISSING_FILE = "missing_file"


class BadInput(Exception):
    """An item that cannot be used; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _where(segment: Any) -> str:
    return str(segment.path) if getattr(segment, "path", None) is not None else "inline data"


def _check_file(segment: Any) -> None:
    if segment.data is None and not Path(segment.path).is_file():
        raise BadInput(MISSING_FILE, f"{segment.path}: file not found")


def _open_pil(segment: Any):
    from PIL import Image

    data = segment.data
    if data is None:
        return Image.open(Path(segment.path))
    if isinstance(data, bytes | bytearray):
        return Image.open(io.BytesIO(data))
    if isinstance(data, Image.Image):
        return data
    if isinstance(data, torch.Tensor):  # (3, H, W) in [0, 1]
        data = (data.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    arr = np.asarray(data)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def _resize(image, resolution: int | tuple[int, int]):
    from PIL import Image

    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    if image.size == (width, height):
        return image
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def load_image(segment: Any, resolution: int | tuple[int, int] | None = None) -> torch.Tensor:
    """An ImageSegment -> (3, H, W) float32 in [0, 1]; resolution: side (square) or (height, width), None = as is."""
    _check_file(segment)
    try:
        # convert() decodes every pixel: a truncated file fails here, not inside the tokenizer.
        image = _open_pil(segment).convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise BadInput(CORRUPT_IMAGE, f"{_where(segment)}: cannot decode image: {err}") from err
    if resolution:
        image = _resize(image, resolution)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_audio(segment: Any, sample_rate: int | None = None) -> torch.Tensor:
    """An AudioSegment -> mono (T,) float32 at `sample_rate` (None = the file's own rate)."""
    data = segment.data
    _check_file(segment)
    try:
        if data is not None and not isinstance(data, bytes | bytearray):
            if not segment.sample_rate:
                raise BadInput(CORRUPT_AUDIO, f"{_where(segment)}: waveform given without a sample rate")
            wave, rate = np.asarray(data, dtype=np.float32), int(segment.sample_rate)
            wave = wave if wave.ndim == 1 else wave.reshape(wave.shape[0], -1).mean(axis=1)
        else:
            import soundfile

            source = io.BytesIO(data) if data is not None else Path(segment.path)
            frames, rate = soundfile.read(source, dtype="float32", always_2d=True)
            wave = frames.mean(axis=1)
    except BadInput:
        raise
    except Exception as err:  # soundfile.LibsndfileError, RuntimeError, ValueError, ...
        raise BadInput(CORRUPT_AUDIO, f"{_where(segment)}: cannot decode audio: {err}") from err
    if wave.size == 0:
        raise BadInput(CORRUPT_AUDIO, f"{_where(segment)}: no samples")
    if not np.isfinite(wave).all():
        raise BadInput(CORRUPT_AUDIO, f"{_where(segment)}: samples that are not finite")
    out = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    if sample_rate and rate != sample_rate:
        import torchaudio.functional

        out = torchaudio.functional.resample(out, rate, sample_rate)
    return out
