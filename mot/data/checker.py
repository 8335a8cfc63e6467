"""Pixel-level checks of demo-corpus images against their captions (for data tests and scoring generations).

    caption_matches("a red circle on the left and a blue square on the right", "images/000001.png")

Each pixel is background (bright and grey-ish) or the nearest palette colour of `mot.data.demo.COLOURS`
(or nothing, when it is near none of them). A colour counts as present when it covers at least
`min_fraction` of the image; the demo draws each colour once, so one colour's pixels are one shape, whose
kind follows from how much of its bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2) and whose
position is the nearest of the named anchor points to the box's centre.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mot.data.demo import COLOURS, PHRASES, POSITIONS, SHAPES

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)
_BACKGROUND, _OTHER = -1, -2
MAX_DISTANCE = 110.0  # RGB distance beyond which a non-background pixel is no palette colour
_PHRASE_TO_POSITION = {phrase: pos for pos, phrase in PHRASES.items()}
_CAPTION_ITEM = re.compile(
    rf"\b({'|'.join(_NAMES)}) ({'|'.join(SHAPES)}) ({'|'.join(map(re.escape, _PHRASE_TO_POSITION))})\b"
)


def to_pixels(image: Any) -> np.ndarray:
    """A path, PIL image, (H, W, 3) uint8 array or (3, H, W) tensor in [0, 1] -> (H, W, 3) uint8 array."""
    if isinstance(image, str | Path):
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image tensor (3, H, W), got shape {tuple(image.shape)}")
        return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an image array (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    return arr


def colour_map(image: Any) -> np.ndarray:
    """(H, W) index into COLOURS per pixel; -1 background, -2 no palette colour."""
    px = to_pixels(image).astype(np.float32)
    bright, spread = px.mean(axis=2), px.max(axis=2) - px.min(axis=2)
    distance = np.linalg.norm(px[:, :, None, :] - _PALETTE[None, None], axis=3)  # (H, W, colours)
    index = distance.argmin(axis=2)
    index = np.where(distance.min(axis=2) > MAX_DISTANCE, _OTHER, index)
    return np.where((bright > 170) & (spread < 60), _BACKGROUND, index)


def _counts(cmap: np.ndarray) -> dict[str, int]:
    counts = np.bincount(cmap.ravel() + 2, minlength=len(_NAMES) + 2)[2:]
    order = np.argsort(-counts, kind="stable")
    return {_NAMES[i]: int(counts[i]) for i in order if counts[i]}


def colour_counts(image: Any) -> dict[str, int]:
    """Pixels per palette colour (colours with none left out), largest first."""
    return _counts(colour_map(image))


def dominant_colour(image: Any) -> str:
    """Name of the most frequent non-background palette colour; "none" when there is none."""
    counts = colour_counts(image)
    return next(iter(counts), "none")


def _classify(mask: np.ndarray) -> tuple[str, str]:
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    # Box centre from the 1st..99th percentile: a few stray pixels do not move it.
    cx = (np.percentile(xs, 1) + np.percentile(xs, 99) + 1) / 2 / width
    cy = (np.percentile(ys, 1) + np.percentile(ys, 99) + 1) / 2 / height
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return shape, position


def shapes_in(image: Any, min_fraction: float = 0.01) -> list[dict[str, str]]:
    """One {"colour", "shape", "position"} per palette colour covering at least min_fraction of the image."""
    cmap = colour_map(image)
    found = []
    for name, count in _counts(cmap).items():
        if count < min_fraction * cmap.size:
            continue
        shape, position = _classify(cmap == _NAMES.index(name))
        found.append({"colour": name, "shape": shape, "position": position})
    return found


def parse_caption(caption: str) -> list[dict[str, str]]:
    """The shapes a demo caption names, in order: [{"colour", "shape", "position"}, ...]."""
    return [
        {"colour": c, "shape": s, "position": _PHRASE_TO_POSITION[p]}
        for c, s, p in _CAPTION_ITEM.findall(caption.lower())
    ]


def caption_matches(
    caption: str,
    image: Any,
    check_shapes: bool = True,
    check_positions: bool = True,
    min_fraction: float = 0.01,
) -> bool:
    """True when the image holds exactly the colours the caption names, each of the named shape and position."""
    named = parse_caption(caption)
    if not named:
        return False
    found = {s["colour"]: s for s in shapes_in(image, min_fraction)}
    if set(found) != {s["colour"] for s in named}:
        return False
    for want in named:
        got = found[want["colour"]]
        if check_shapes and got["shape"] != want["shape"]:
            return False
        if check_positions and got["position"] != want["position"]:
            return False
    return True
