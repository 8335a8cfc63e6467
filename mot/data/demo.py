"""The bundled demo corpus: coloured shapes with exact captions, and the same captions spoken.

Offline and deterministic (a seed gives the same bytes on the same machine), small enough for a CPU:

    generate_demo_corpus("data/demo")      # 2400 images, 400 spoken captions, ~2200 documents, ~30 MB

Every image is 64x64 RGB on a plain light background with one or two shapes (circle, square, triangle) in
distinct saturated colours, at a named position; its caption says exactly that ("a red circle on the left
and a blue square on the right"), so `mot.data.checker` can score a generated image against its caption.

Layout of `out_dir` (JSONL rows as `mot.data.documents` reads them, paths relative to the JSONL's folder):

    documents.jsonl   {"id": "doc-000001", "segments": [{"type": "text", "text": "..."},
                                                        {"type": "image", "path": "images/000001.png"}]}
    images/*.png      images.jsonl  {"path", "caption", "background", "shapes": [{"colour", "shape", "position"}]}
    audio/*.wav       audio.jsonl   {"path", "text", "voice", "speed", "seconds"}  (16 kHz mono 16-bit)
    summary.json      counts by document kind, sizes, the palette

Document kinds: [caption, image], [image, caption], interleaved (caption, image, caption, image[, ...],
or image-first), and with speech (espeak-ng) [caption, audio] and [audio, caption].
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

IMAGE_SIZE = 64
SAMPLE_RATE = 16_000
IMAGES_AT_SCALE_1 = 2400  # ~250 bytes each: flat colours compress well
SPOKEN_AT_SCALE_1 = 400  # 16-bit 16 kHz audio is 32 kB/s: 400 captions of ~2 s are ~25 MB, most of the corpus

# Saturated colours far apart in RGB, so the nearest palette colour of a pixel is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 248),
    "grey": (230, 230, 230),
    "cream": (248, 240, 220),
}
SHAPES = ("circle", "square", "triangle")
# Centre of a shape at each position, as a fraction of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "center": "in the center"}
PAIRS = (("left", "right"), ("top", "bottom"))
PREFIXES = ("", "", "a picture of ", "an image of ", "this image shows ")
VOICES = ("en-us", "en-us+m3", "en-us+f2", "en-us+f4", "en-gb")
SPEEDS = (180, 195, 210)  # words per minute


# ---------------------------------------------------------------- scenes and captions


def random_scene(rng: random.Random, p_single: float = 0.4) -> list[dict[str, str]]:
    """One (with probability p_single) or two shapes with distinct colours: [{"colour", "shape", "position"}, ...]."""
    if rng.random() < p_single:
        positions = [rng.choice(list(POSITIONS))]
    else:
        positions = list(rng.choice(PAIRS))
        rng.shuffle(positions)  # the caption names them in this order
    colours = rng.sample(list(COLOURS), len(positions))
    return [{"colour": c, "shape": rng.choice(SHAPES), "position": p} for c, p in zip(colours, positions, strict=True)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_of(scene: list[dict[str, str]], prefix: str = "") -> str:
    parts = [f"{_article(s['colour'])} {s['colour']} {s['shape']} {PHRASES[s['position']]}" for s in scene]
    return prefix + " and ".join(parts)


def draw_scene(scene: list[dict[str, str]], rng: random.Random, background: str) -> Image.Image:
    """Flat colours, no anti-aliasing: every pixel is the background or one palette colour."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for s in scene:
        side = rng.randint(18, 28) if len(scene) == 1 else rng.randint(14, 22)
        fx, fy = POSITIONS[s["position"]]
        cx = round(fx * IMAGE_SIZE) + rng.randint(-3, 3)
        cy = round(fy * IMAGE_SIZE) + rng.randint(-3, 3)
        x0, y0 = cx - side // 2, cy - side // 2
        x1, y1 = x0 + side, y0 + side
        colour = COLOURS[s["colour"]]
        if s["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif s["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:  # triangle, pointing up
            draw.polygon([(cx, y0), (x0, y1), (x1, y1)], fill=colour)
    return image


# ---------------------------------------------------------------- speech


def synthesize(text: str, voice: str = "en-us", speed: int = 175) -> np.ndarray:
    """espeak-ng -> float32 mono waveform at 16 kHz, leading and trailing silence trimmed to 50 ms."""
    result = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], capture_output=True, check=False
    )
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"espeak-ng -v {voice} failed on {text!r}: {result.stderr.decode(errors='replace').strip()}")
    wav, rate = sf.read(io.BytesIO(result.stdout), dtype="float32", always_2d=True)
    from torchaudio.functional import resample  # imported here: only speech needs torchaudio

    wav = resample(torch.from_numpy(wav.mean(axis=1)), rate, SAMPLE_RATE).numpy()
    loud = np.flatnonzero(np.abs(wav) > 0.01 * np.abs(wav).max())
    margin = SAMPLE_RATE // 20
    if loud.size:
        wav = wav[max(0, loud[0] - margin) : loud[-1] + margin]
    return np.clip(wav, -1.0, 1.0)


def _speak_all(jobs: list[dict[str, Any]], audio_dir: Path, progress: bool) -> None:
    """Synthesise every job into audio_dir/<name>.wav (threads: the work happens in espeak-ng processes)."""

    def run(job: dict[str, Any]) -> dict[str, Any]:
        wav = synthesize(job["text"], job["voice"], job["speed"])
        sf.write(audio_dir / job["file"], wav, SAMPLE_RATE, subtype="PCM_16")
        return job | {"seconds": round(len(wav) / SAMPLE_RATE, 3)}

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the resampling is tiny; threads inside threads only contend
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            done = list(tqdm(pool.map(run, jobs), total=len(jobs), desc="speech", unit="clip", disable=not progress))
    finally:
        torch.set_num_threads(torch_threads)
    for job, result in zip(jobs, done, strict=True):
        job["seconds"] = result["seconds"]


# ---------------------------------------------------------------- the corpus


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _image_documents(images: list[dict[str, Any]], rng: random.Random) -> list[tuple[str, list[dict]]]:
    """Group images into documents; the kinds cycle so that even a tiny corpus has each of them."""
    kinds = ("text-image", "image-text", "text-image", "interleaved-text-first", "image-text", "text-image",
             "image-text", "interleaved-image-first")
    documents, i, k = [], 0, 0
    while i < len(images):
        kind = kinds[k % len(kinds)]
        k += 1
        n = rng.randint(2, 3) if kind.startswith("interleaved") else 1
        group = images[i : i + n]
        i += n
        if kind.startswith("interleaved") and len(group) < 2:
            kind = "text-image"
        text_first = kind in ("text-image", "interleaved-text-first")
        segments = []
        for img in group:
            pair = [_text(img["caption"]), {"type": "image", "path": img["path"]}]
            segments += pair if text_first else pair[::-1]
        documents.append((kind, segments))
    return documents


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if (out / "documents.jsonl").exists():
        if not overwrite:
            raise FileExistsError(f"{out}: already holds documents.jsonl; pass overwrite=True to regenerate it")
        for sub, pattern in (("images", "*.png"), ("audio", "*.wav")):
            for f in (out / sub).glob(pattern):
                f.unlink()
        for name in ("documents.jsonl", "images.jsonl", "audio.jsonl", "summary.json"):
            (out / name).unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate_demo_corpus(
    out_dir: str | Path,
    scale: float = 1.0,
    seed: int = 0,
    speech: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the demo corpus into `out_dir` and return its summary (also saved as summary.json).

    scale multiplies the counts (1.0: 2400 images, 400 spoken captions; at least one of each).
    speech=False, or no `espeak-ng` on PATH (a message says so), leaves out the spoken captions.
    The same seed gives the same files; the images do not depend on whether speech is on.
    """
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    n_images = max(1, round(IMAGES_AT_SCALE_1 * scale))
    n_spoken = max(1, round(SPOKEN_AT_SCALE_1 * scale))
    if speech and shutil.which("espeak-ng") is None:
        print("demo corpus: espeak-ng not found on PATH, skipping the spoken captions (install espeak-ng for them)")
        speech = False

    # Independent random streams: images, speech and document order do not shift one another.
    rng_images = random.Random(f"{seed}/images")
    rng_speech = random.Random(f"{seed}/speech")
    rng_order = random.Random(f"{seed}/order")

    images = []
    for i in tqdm(range(1, n_images + 1), desc="images", unit="img", disable=not progress):
        scene = random_scene(rng_images)
        background = rng_images.choice(list(BACKGROUNDS))
        name = f"images/{i:06d}.png"
        draw_scene(scene, rng_images, background).save(out / name, optimize=True)
        caption = caption_of(scene, rng_images.choice(PREFIXES))
        images.append({"path": name, "caption": caption, "background": background, "shapes": scene})
    documents = _image_documents(images, rng_images)

    clips: list[dict[str, Any]] = []
    if speech:
        (out / "audio").mkdir(exist_ok=True)
        for i in range(1, n_spoken + 1):
            scene = random_scene(rng_speech, p_single=0.6)  # shorter clips on average: audio is most of the bytes
            clips.append({"file": f"{i:06d}.wav", "text": caption_of(scene), "voice": rng_speech.choice(VOICES),
                          "speed": rng_speech.choice(SPEEDS)})
        _speak_all(clips, out / "audio", progress)
        for i, clip in enumerate(clips):
            audio = {"type": "audio", "path": f"audio/{clip['file']}"}
            text_first = i % 2 == 0
            segments = [_text(clip["text"]), audio] if text_first else [audio, _text(clip["text"])]
            documents.append(("text-audio" if text_first else "audio-text", segments))

    rng_order.shuffle(documents)
    rows = [{"id": f"doc-{i:06d}", "segments": segments} for i, (_, segments) in enumerate(documents, 1)]
    _write_jsonl(out / "images.jsonl", images)
    if speech:
        _write_jsonl(out / "audio.jsonl", [
            {"path": f"audio/{c['file']}", "text": c["text"], "voice": c["voice"], "speed": c["speed"],
             "seconds": c["seconds"]} for c in clips
        ])
    _write_jsonl(out / "documents.jsonl", rows)

    kinds: dict[str, int] = {}
    for kind, _ in documents:
        kinds[kind] = kinds.get(kind, 0) + 1
    summary = {
        "generator": "mot.data.demo",
        "seed": seed,
        "scale": scale,
        "documents": len(rows),
        "documents_by_kind": dict(sorted(kinds.items())),
        "images": len(images),
        "image_size": IMAGE_SIZE,
        "spoken_captions": len(clips),
        "audio_seconds": round(sum(c["seconds"] for c in clips), 1),
        "sample_rate": SAMPLE_RATE if speech else None,
        "speech": speech,
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
        "positions": list(POSITIONS),
        "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),  # before summary.json
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
