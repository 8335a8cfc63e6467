"""Synthetic webdataset-style tar shards of captioned images, some with audio: data for benchmarks and tests.

    write_shards("demo", "data/bench/demo", samples=100_000, per_tar=1000, workers=16)  # -> one dict per tar

Kinds (members of one sample share the KEY before the first dot, as webdataset's do):

    demo       KEY.png: 64 px, one or two flat-coloured shapes on a light background (the demo corpus's look);
               KEY.txt: a caption of 10-30 words; for a fraction of the samples KEY.wav: 1-3 s of speech-like
               audio (16 kHz mono 16-bit: harmonics on a moving pitch, syllable-rate envelope, noise), written
               with the stdlib `wave` module
    scenes     the scaling corpus (mot.data.scenes): KEY.png, 64 px scenes of 1-4 objects or icons of a theme;
               KEY.txt: a caption of 15-60 words; KEY.wav for a fraction of the samples
    chameleon  KEY.jpg: JPEG (quality 90) with sides in [min_side, max_side] (varied aspect ratios): a colour
               gradient, shapes, blotches and grain, so that decoding costs about what a photo of that size
               does; KEY.json: {"caption": ...}

Tars are uncompressed. Deterministic: sample k of a seed is the same bytes in whichever process writes it.
Only numpy and PIL are needed.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mot.data.icons import find_icons
from mot.data.scenes import sample_members
from mot.data.synthetic_audio import speech_like, wav_bytes

KINDS = ("demo", "chameleon", "scenes")  # append only: a kind's index seeds its samples
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 210, 20),
           "purple": (140, 40, 180), "orange": (250, 130, 20)}
BACKGROUNDS = {"white": (248, 248, 248), "grey": (230, 230, 230), "cream": (248, 240, 220)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
             "center": (0.5, 0.5)}
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "center": "in the center"}
FILLER = ("drawn with flat colours", "on a plain {bg} background", "with nothing else in the picture",
          "in a small square image", "with sharp straight edges", "seen from straight ahead", "and no shadows",
          "in the style of a simple diagram", "next to some empty space", "under even light",
          "as a child might draw it", "with clean borders around it")
WORDS = ("the", "a", "of", "and", "with", "light", "warm", "morning", "street", "window", "old", "tree", "river",
         "people", "walking", "near", "bright", "small", "house", "sky", "blue", "green", "under", "over", "city",
         "field", "mountain", "road", "two", "three", "dog", "cat", "red", "car", "table", "book", "photo", "view")


def _rng(seed: int, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, KINDS.index(kind), index])


# ---------------------------------------------------------------- demo samples


def demo_caption(rng: np.random.Generator, scene: list[tuple[str, str, str]], background: str) -> str:
    """"a red circle on the left and a blue square on the right" + filler clauses: 10-30 words."""
    parts = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s} {PHRASES[p]}" for c, s, p in scene]
    words = " and ".join(parts).split()
    target = int(rng.integers(10, 31))
    for i in rng.permutation(len(FILLER)):
        clause = FILLER[i].format(bg=background).split()
        if len(words) + len(clause) > target:
            continue
        words += clause
    return " ".join(words)


def demo_image(rng: np.random.Generator, size: int = 64) -> tuple[bytes, str]:
    """(PNG bytes, caption) of one or two shapes in distinct colours."""
    if rng.random() < 0.4:
        positions = [str(rng.choice(list(POSITIONS)))]
    else:
        positions = list((("left", "right"), ("top", "bottom"))[int(rng.integers(2))])[:: int(rng.choice([1, -1]))]
    colours = [str(c) for c in rng.choice(list(COLOURS), len(positions), replace=False)]
    scene = [(c, str(rng.choice(SHAPES)), p) for c, p in zip(colours, positions, strict=True)]
    background = str(rng.choice(list(BACKGROUNDS)))
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for colour, shape, position in scene:
        side = round(size * (rng.uniform(0.28, 0.44) if len(scene) == 1 else rng.uniform(0.22, 0.34)))
        cx = round(POSITIONS[position][0] * size) + int(rng.integers(-3, 4))
        cy = round(POSITIONS[position][1] * size) + int(rng.integers(-3, 4))
        x0, y0 = cx - side // 2, cy - side // 2
        box = (x0, y0, x0 + side, y0 + side)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(cx, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=COLOURS[colour])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), demo_caption(rng, scene, background)


# ---------------------------------------------------------------- chameleon-size samples

_GRAIN: dict[int, np.ndarray] = {}  # per process: a noise field to crop grain from (drawing it per image costs more)


def photo_like(rng: np.random.Generator, min_side: int, max_side: int, quality: int = 90) -> tuple[bytes, str]:
    """(JPEG bytes, caption): sides in [min_side, max_side]."""
    width, height = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * np.linspace(0, 1, width)[None, :] + np.sin(angle) * np.linspace(0, 1, height)[:, None])
    ramp = (ramp - ramp.min()) / max(1e-6, np.ptp(ramp))
    image = Image.fromarray((c0 + ramp[..., None] * (c1 - c0)).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(8, 24))):
        x0, x1 = sorted(rng.integers(-width // 4, width * 5 // 4, 2))
        y0, y1 = sorted(rng.integers(-height // 4, height * 5 // 4, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(4)
        if kind == 0:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=fill)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill, outline=(0, 0, 0), width=int(rng.integers(1, 4)))
        elif kind == 2:
            draw.polygon([tuple(int(v) for v in p) for p in rng.integers(0, (width, height), (5, 2))], fill=fill)
        else:
            draw.line([tuple(int(v) for v in p) for p in rng.integers(0, (width, height), (4, 2))], fill=fill,
                      width=int(rng.integers(2, 12)))
    blotches = Image.fromarray(rng.integers(0, 256, (max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8))
    blotches = np.asarray(blotches.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    if max_side not in _GRAIN:
        _GRAIN[max_side] = np.random.default_rng(0).normal(0, 1, (max_side + 64, max_side + 64, 3)).astype(np.float32)
    oy, ox = (int(v) for v in rng.integers(0, 64, 2))
    grain = _GRAIN[max_side][oy : oy + height, ox : ox + width] * rng.uniform(2, 6)
    pixels = np.asarray(image, dtype=np.int16) * 3 // 4 + (blotches - 128) // 5 + grain.astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buf, format="JPEG", quality=quality)
    caption = " ".join(str(w) for w in rng.choice(WORDS, int(rng.integers(8, 25))))
    return buf.getvalue(), caption


# ---------------------------------------------------------------- tars


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def members_of(kind: str, rng: np.random.Generator, task: dict[str, Any]) -> tuple[dict[str, bytes], float]:
    """One sample's members by extension ({"png", "txt"[, "wav"]} or {"jpg", "json"}) and its audio seconds."""
    if kind == "demo":
        png, caption = demo_image(rng, task.get("image_size", 64))
        members = {"png": png, "txt": caption.encode()}
        if rng.random() < task.get("audio_fraction", 0.0):
            seconds = float(rng.uniform(1.0, 3.0))
            members["wav"] = wav_bytes(speech_like(rng, seconds))
            return members, seconds
        return members, 0.0
    if kind == "scenes":
        return sample_members(rng, task)
    jpeg, caption = photo_like(rng, task.get("min_side", 480), task.get("max_side", 800), task.get("quality", 90))
    return {"jpg": jpeg, "json": json.dumps({"caption": caption}).encode()}, 0.0


def write_tar(task: dict[str, Any]) -> dict[str, Any]:
    """Write samples [first, first + count) of one kind into task["path"] (via a temporary name)."""
    kind, path, seed = task["kind"], Path(task["path"]), task["seed"]
    start = time.perf_counter()
    counts = {"path": str(path), "samples": 0, "images": 0, "audio": 0, "audio_seconds": 0.0}
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for index in range(task["first"], task["first"] + task["count"]):
            members, seconds = members_of(kind, _rng(seed, kind, index), task)
            for ext, data in members.items():
                _add(tar, f"{index:09d}.{ext}", data)
            counts["audio"] += "wav" in members
            counts["audio_seconds"] += seconds
            counts["samples"] += 1
            counts["images"] += 1
    tmp.replace(path)
    counts["bytes"] = path.stat().st_size
    counts["seconds"] = time.perf_counter() - start
    return counts


def tar_tasks(kind: str, out_dir: str | Path, samples: int, per_tar: int, seed: int,
              options: dict[str, Any]) -> list[dict[str, Any]]:
    """write_tar's tasks: samples [first, first + per_tar) into `{kind}-NNNNN.tar` under out_dir."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: choose from {list(KINDS)}")
    if samples <= 0 or per_tar <= 0:
        raise ValueError(f"samples ({samples}) and per_tar ({per_tar}) must be positive")
    return [{"kind": kind, "path": str(Path(out_dir) / f"{kind}-{i:05d}.tar"), "first": first,
             "count": min(per_tar, samples - first), "seed": seed, **options}
            for i, first in enumerate(range(0, samples, per_tar))]


def scenes_options(icon_dir: str | Path | None = None, icon_fraction: float = 0.2, audio_fraction: float = 0.25,
                   speech_engine: str = "synthetic", speech_max_words: int = 24) -> dict[str, Any]:
    """The scaling corpus's sample options (see mot.data.scenes.sample_members), the icon folder checked."""
    options: dict[str, Any] = {"audio_fraction": audio_fraction, "speech": speech_engine,
                               "speech_max_words": speech_max_words}
    if icon_dir:
        if not find_icons(icon_dir):
            raise FileNotFoundError(f"{icon_dir}: no usable PNG icons (see mot.data.icons)")
        options |= {"icon_dir": str(icon_dir), "icon_fraction": icon_fraction}
    return options


def write_shards(kind: str, out_dir: str | Path, samples: int, per_tar: int = 1000, workers: int = 1,
                 seed: int = 0, progress: Any = None, **options: Any) -> list[dict[str, Any]]:
    """`samples` samples of `kind` in tars of `per_tar` under out_dir (`{kind}-00000.tar`, ...), written by a
    spawn pool of `workers` processes (1: here). options: audio_fraction, image_size (demo); min_side,
    max_side, quality (chameleon); audio_fraction, icon_dir, icon_fraction, speech (scenes). progress(done_tars,
    total_tars) is called as tars finish. One dict per tar, in order: path, samples, images, audio,
    audio_seconds, bytes, seconds."""
    tasks = tar_tasks(kind, out_dir, samples, per_tar, seed, options)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    results = []
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            results.append(write_tar(task))
            if progress:
                progress(len(results), len(tasks))
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            for result in pool.imap_unordered(write_tar, tasks):
                results.append(result)
                if progress:
                    progress(len(results), len(tasks))
    return sorted(results, key=lambda r: r["path"])


def write_scenes(out_dir: str | Path, samples: int, per_tar: int = 5000, workers: int = 1, seed: int = 0,
                 icon_dir: str | Path | None = None, icon_fraction: float = 0.2, audio_fraction: float = 0.25,
                 speech_engine: str = "synthetic", speech_max_words: int = 24,
                 progress: Any = None) -> list[dict[str, Any]]:
    """Write the scaling corpus as `scenes-NNNNN.tar` under out_dir (see the module docstring); one dict per
    tar as synthetic_docs.write_shards returns. Measured per sample: a scene PNG ~330 bytes, an icon PNG
    ~3 kB, a caption ~230 bytes, audio ~290 kB (~9 s at 32 kB/s); docs/results/scaling/README.md has more."""
    options = scenes_options(icon_dir, icon_fraction, audio_fraction, speech_engine, speech_max_words)
    return write_shards("scenes", out_dir, samples, per_tar, workers, seed, progress, **options)
