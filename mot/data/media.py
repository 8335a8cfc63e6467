"""Decoding a document's images and audio into what the tokenizers take.

Images: decoded to RGB, with any transparency (RGBA, LA, a palette or colour key with transparency)
composited onto white first, as Chameleon's preprocessing does; then brought to the resolution by a named
policy (`IMAGE_POLICIES`): "center_crop" resizes (BICUBIC) so the shorter side matches and crops the centre
(taming-transformers' preprocessing, the default); "pad" resizes so the longer side matches and pastes the
whole image centred on white. `decode_image` gives (3, H, W) uint8, `load_image` the same as float32 in
[0, 1]. Audio: mono (channels averaged), resampled with `torchaudio.functional.resample` when the rate
differs, as a (T,) float tensor.

A segment's `data` may be a `FileRange` (a byte range of a file, e.g. a member of an uncompressed tar): its
bytes are read here, so a reader hands prepare's workers only the range and the workers read and decode it.
A file that cannot be read or decoded raises `BadInput`, which prepare counts by its reason instead of failing.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

CORRUPT_IMAGE = "corrupt_image"
CORRUPT_AUDIO = "corrupt_audio"
MISSING_FILE = "missing_file"

IMAGE_POLICIES = ("center_crop", "pad")
WHITE = (255, 255, 255)


class BadInput(Exception):
    """An item that cannot be used; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class FileRange:
    """`size` bytes from `offset` of the file at `path`: a reference that pickles small, read when decoded."""

    path: Path
    offset: int
    size: int

    def read_bytes(self) -> bytes:
        """The range's bytes; OSError when the file is missing or shorter than the range."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.path}: read {len(data)} of {self.size} bytes at offset {self.offset}")
        return data


def _where(segment: Any) -> str:
    data = getattr(segment, "data", None)
    if isinstance(data, FileRange):
        return f"{data.path} (offset {data.offset}, {data.size} bytes)"
    return str(segment.path) if getattr(segment, "path", None) is not None else "inline data"


def _check_file(segment: Any) -> None:
    if segment.data is None and not Path(segment.path).is_file():
        raise BadInput(MISSING_FILE, f"{segment.path}: file not found")


def _open_pil(segment: Any):
    from PIL import Image

    data = segment.data
    if data is None:
        return Image.open(Path(segment.path))
    if isinstance(data, FileRange):
        data = data.read_bytes()
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


def _to_rgb(image):
    """RGB; transparent pixels composited onto white (Chameleon's `_whiten_transparency` arithmetic).
    An image without transparency, or whose alpha is 255 everywhere, is `image.convert("RGB")` unchanged."""
    from PIL import Image

    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in image.info:
        return image.convert("RGB")  # decodes every pixel: a truncated file fails here, not in the tokenizer
    rgba = np.asarray(image.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return image.convert("RGB")
    alpha = rgba[:, :, 3:] / 255.0
    return Image.fromarray(((1 - alpha) * 255 + alpha * rgba[:, :, :3]).astype(np.uint8), "RGB")


def _size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from a side or a pair."""
    return (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))


def _center_crop(image, resolution: int | tuple[int, int]):
    from PIL import Image

    height, width = _size(resolution)
    if image.size == (width, height):
        return image
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def _pad(image, resolution: int | tuple[int, int]):
    from PIL import Image

    height, width = _size(resolution)
    if image.size == (width, height):
        return image
    scale = min(height / image.height, width / image.width)
    size = (max(1, min(width, round(image.width * scale))), max(1, min(height, round(image.height * scale))))
    canvas = Image.new("RGB", (width, height), WHITE)
    canvas.paste(image.resize(size, Image.Resampling.BICUBIC), ((width - size[0]) // 2, (height - size[1]) // 2))
    return canvas


_RESIZE = {"center_crop": _center_crop, "pad": _pad}


def decode_image(
    segment: Any, resolution: int | tuple[int, int] | None = None, policy: str = "center_crop"
) -> torch.Tensor:
    """An ImageSegment -> (3, H, W) uint8 RGB; resolution: side (square) or (height, width), None = as is;
    policy: one of IMAGE_POLICIES (see the module docstring)."""
    if policy not in _RESIZE:
        raise ValueError(f"image policy {policy!r}: choose from {list(IMAGE_POLICIES)}")
    _check_file(segment)
    try:
        image = _to_rgb(_open_pil(segment))
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        # PIL names in-memory bytes by their repr, a memory address: the detail would differ by run
        message = re.sub(r" <[^<>]* at 0x[0-9a-fA-F]+>", " (the image bytes)", str(err))
        raise BadInput(CORRUPT_IMAGE, f"{_where(segment)}: cannot decode image: {message}") from err
    if resolution:
        image = _RESIZE[policy](image, resolution)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def load_image(
    segment: Any, resolution: int | tuple[int, int] | None = None, policy: str = "center_crop"
) -> torch.Tensor:
    """An ImageSegment -> (3, H, W) float32 in [0, 1]: `decode_image(...)` / 255."""
    return decode_image(segment, resolution, policy).float() / 255


def load_audio(segment: Any, sample_rate: int | None = None) -> torch.Tensor:
    """An AudioSegment -> mono (T,) float32 at `sample_rate` (None = the file's own rate)."""
    data = segment.data
    _check_file(segment)
    source = None
    try:
        if isinstance(data, FileRange):
            data = data.read_bytes()
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
        # soundfile names an in-memory file by its repr, a memory address: the detail would differ by run
        message = str(err).replace(repr(source), "the audio bytes") if isinstance(source, io.BytesIO) else err
        raise BadInput(CORRUPT_AUDIO, f"{_where(segment)}: cannot decode audio: {message}") from err
    if wave.size == 0:
        raise BadInput(CORRUPT_AUDIO, f"{_where(segment)}: no samples")
    if not np.isfinite(wave).all():
        raise BadInput(CORRUPT_AUDIO, f"{_where(segment)}: samples that are not finite")
    out = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    if sample_rate and rate != sample_rate:
        import torchaudio.functional

        out = torchaudio.functional.resample(out, rate, sample_rate)
    return out
