"""Richer captioned scenes for the scaling study (issue 19): several objects with sizes, textures, counts and
relations, drawn at 64 px so the demo VQGAN applies, with captions whose every fact is true of the image.

    synthetic_docs.write_scenes("data/scenes", samples=2_000_000, workers=16,
                                icon_dir="icons/usr/share/icons/oxygen/base")
    # = synthetic_docs.write_shards("scenes", ...): tars of KEY.png, KEY.txt and, for some samples, KEY.wav

A scene holds 1 to 4 objects in at most 4 groups; a group is 1 to 3 (4 when alone) identical objects:

    shapes    circle square triangle star ring cross diamond hexagon
    colours   red green blue yellow purple orange pink brown black teal (a colour names one group only)
    sizes     small (~9 px, always solid), medium (~14 px), large (~21 px)
    textures  solid, striped and dotted (white stripes or dots inside a 2 px border of the colour), outlined
              (a 2 px border on the background; never a ring, whose two borders would be two pieces)
    backgrounds  white grey cream beige mint lavender (no colour word names a background)

Objects never overlap (2 px gaps), so each object is one connected piece of its colour. A caption is
"COUNT [SIZE] [TEXTURE] COLOUR SHAPE(S)" per group in one of four sentence frames, relations of a single
object to another group along the axis where their centres differ most ("the red ring is above the green
crosses", "there is a blue star to the left of the pink square"; for a group, only when it holds for each
member), the region of some single objects ("in the top left"), sometimes the total ("there are four shapes
in all"), the background, and filler sentences without colour, shape, size or number words: 15-60 words
(the facts of a crowded scene alone can run to ~70).

With `icon_dir` (an unpacked icon theme, see mot.data.icons), a fraction `icon_fraction` of samples are icons
on a background instead. A fraction `audio_fraction` of samples carry speech-like audio about as long as
their caption spoken (synthetic_audio.speech_like; those captions get filler only to `speech_max_words`);
`speech="espeak"` speaks the caption with espeak-ng instead (needs espeak-ng and torchaudio).
"""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mot.data import icons as icon_theme
from mot.data.synthetic_audio import speech_like, wav_bytes

IMAGE_SIZE = 64
GAP = 2  # pixels between any two objects' boxes
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 200, 0),
    "purple": (140, 40, 180), "orange": (250, 120, 0), "pink": (250, 110, 190), "brown": (130, 75, 30),
    "black": (20, 20, 20), "teal": (0, 140, 140)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 248), "grey": (215, 215, 215), "cream": (248, 240, 215), "beige": (235, 220, 190),
    "mint": (215, 245, 225), "lavender": (230, 225, 250)}
PATTERN = (255, 255, 255)  # stripes and dots: a white no background or colour uses
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
SIZES = {"small": (8, 10), "medium": (13, 16), "large": (19, 23)}  # side of the object's box, inclusive range
TEXTURES = ("solid", "striped", "dotted", "outlined")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = {"above": ("above", "over"), "below": ("below", "under", "beneath"),
             "left of": ("to the left of", "left of"), "right of": ("to the right of", "right of")}
PREFIXES = ("", "a picture of ", "an image of ", "this image shows ", "here we see ", "a drawing of ",
            "the picture contains ")
FILLER = ("everything is drawn with flat colours", "the edges are sharp", "it is seen from straight ahead",
          "there are no shadows", "it looks like a simple diagram", "the light is even",
          "a child might have drawn it", "nothing touches anything else", "it looks like a page from a picture book",
          "the lines are clean", "it could be a test pattern for a model", "there is no text in the picture",
          "the layout looks random", "there is plenty of empty space", "it is the kind of scene a puzzle book prints",
          "the picture is tiny and simple", "nothing else is in the picture", "the style is plain and flat")
WHERE = {"top left": "in the top left", "top right": "in the top right", "bottom left": "in the bottom left",
         "bottom right": "in the bottom right", "top": "at the top", "bottom": "at the bottom",
         "left": "on the left", "right": "on the right", "middle": "in the middle"}
SPEECH_WORDS_PER_SECOND = (2.2, 3.2)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive


# ---------------------------------------------------------------- scenes


def random_scene(rng: np.random.Generator) -> dict[str, Any]:
    """{"background", "groups": [{"count", "size", "texture", "colour", "shape", "boxes": [...]}]}; boxes are
    placed without overlap (groups shrink to small when a layout does not fit)."""
    n_objects = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.3, 0.25, 0.25]))
    counts: list[int] = []
    while sum(counts) < n_objects:
        counts.append(int(rng.integers(1, min(3, n_objects - sum(counts)) + 1)))
    if counts == [1] * 4 and rng.random() < 0.2:
        counts = [4]
    colours = rng.choice(list(COLOURS), len(counts), replace=False)
    groups = []
    for count, colour in zip(counts, colours, strict=True):
        size = str(rng.choice(list(SIZES), p=[0.35, 0.4, 0.25] if sum(counts) <= 2 else [0.5, 0.4, 0.1]))
        shape = str(rng.choice(SHAPES))
        texture = "solid" if size == "small" else str(rng.choice(TEXTURES, p=[0.4, 0.2, 0.2, 0.2]))
        if shape == "ring" and texture == "outlined":
            texture = "solid"
        groups.append({"count": count, "size": size, "texture": texture, "colour": str(colour), "shape": shape})
    for _ in range(3):
        if _place(rng, groups):
            break
        for g in groups:  # too crowded: shrink and try again
            g["size"], g["texture"] = "small", "solid"
    else:
        raise RuntimeError("scenes: could not place small objects on a 64 px canvas (should not happen)")
    for g in groups:  # a thin shape has no room for stripes or dots inside its border: call it solid
        if g["texture"] in ("striped", "dotted") and not all(_pattern_shows(g, box) for box in g["boxes"]):
            g["texture"] = "solid"
    return {"background": str(rng.choice(list(BACKGROUNDS))), "groups": groups}


def _place(rng: np.random.Generator, groups: list[dict[str, Any]], tries: int = 200) -> bool:
    placed: list[Box] = []
    for g in groups:
        g["boxes"] = []
        lo, hi = SIZES[g["size"]]
        for _ in range(g["count"]):
            for _ in range(tries):
                side = int(rng.integers(lo, hi + 1))
                x0, y0 = (int(v) for v in rng.integers(1, IMAGE_SIZE - side, 2))
                box = (x0, y0, x0 + side - 1, y0 + side - 1)
                if all(_apart(box, other) for other in placed):
                    placed.append(box)
                    g["boxes"].append(box)
                    break
            else:
                return False
    return True


def _apart(a: Box, b: Box) -> bool:
    return a[2] + GAP < b[0] or b[2] + GAP < a[0] or a[3] + GAP < b[1] or b[3] + GAP < a[1]


def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


# ---------------------------------------------------------------- drawing


def _shape_mask(shape: str, box: Box, outline: bool) -> Image.Image:
    """An 'L' mask of one shape in its box (no anti-aliasing: pixels are 0 or 255)."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    kw = {"fill": None, "outline": 255, "width": 2} if outline else {"fill": 255}
    if shape == "circle":
        draw.ellipse(box, **kw)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inner = r * 0.5
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "square":
        draw.rectangle(box, **kw)
    else:
        draw.polygon(_polygon(shape, box, cx, cy, r), **kw)
    return mask


def _polygon(shape: str, box: Box, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "cross":
        a, b = r / 3, r  # arm half-width, arm length
        return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a), (cx + b, cy + a),
                (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b), (cx - a, cy + a), (cx - b, cy + a),
                (cx - b, cy - a), (cx - a, cy - a)]
    if shape == "hexagon":
        return [(cx + r * np.cos(t), cy + r * np.sin(t)) for t in np.arange(6) * np.pi / 3]
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return [(cx + q * np.cos(t), cy + q * np.sin(t)) for q, t in zip(radii, angles, strict=True)]
    raise ValueError(f"unknown shape {shape!r}: choose from {SHAPES}")


def _pattern(texture: str) -> np.ndarray:
    """Where white goes inside a striped or dotted object (a 64x64 boolean grid)."""
    y, x = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    if texture == "striped":
        return (x + y) % 5 < 2  # diagonal stripes
    return (x % 4 == 1) & (y % 4 == 1) | (x % 4 == 2) & (y % 4 == 1)  # dots of 2x1 px every 4 px


def _core(shape: str, box: Box) -> np.ndarray:
    """Inside a shape, 2 px in from its edge: where stripes and dots go, so the colour stays one piece."""
    return np.asarray(_shape_mask(shape, box, outline=False).filter(ImageFilter.MinFilter(5))) > 0


def _pattern_shows(g: dict[str, Any], box: Box) -> bool:
    return int((_core(g["shape"], box) & _pattern(g["texture"])).sum()) >= 4


def draw_scene(scene: dict[str, Any]) -> Image.Image:
    """Every pixel is the background, an object colour, or (inside striped and dotted objects) white."""
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    canvas[:] = BACKGROUNDS[scene["background"]]
    for g in scene["groups"]:
        for box in g["boxes"]:
            mask = _shape_mask(g["shape"], box, outline=g["texture"] == "outlined")
            inside = np.asarray(mask) > 0
            canvas[inside] = COLOURS[g["colour"]]
            if g["texture"] in ("striped", "dotted"):  # keep a 2 px border of the colour: one piece
                canvas[_core(g["shape"], box) & _pattern(g["texture"])] = PATTERN
    return Image.fromarray(canvas, "RGB")


# ---------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + ("es" if shape.endswith("s") else "s")


def group_phrase(g: dict[str, Any], rng: random.Random, definite: bool = False) -> str:
    """"three small blue stars", "a large striped red cross", "the red ring" (definite: colour and shape)."""
    if definite:
        return f"the {g['colour']} {g['shape']}"
    words = []
    if rng.random() < 0.75:
        words.append(g["size"])
    if g["texture"] != "solid" or rng.random() < 0.15:
        words.append(g["texture"])
    words += [g["colour"], _plural(g["shape"], g["count"])]
    count = NUMBERS[g["count"]] if g["count"] > 1 or rng.random() < 0.2 else _article(words[0])
    return " ".join([count, *words])


def relation(a: Box, b: Box) -> str:
    """How a's centre lies from b's along the axis where they differ most: above, below, left of, right of."""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    if abs(ay - by) >= abs(ax - bx):
        return "above" if ay < by else "below"
    return "left of" if ax < bx else "right of"


def region(box: Box) -> str | None:
    """"top left", "bottom", "middle", ... from the centre in thirds of the image; None near a third's edge."""
    x, y = _centre(box)
    third = IMAGE_SIZE / 3

    def part(v: float, names: tuple[str, str, str]) -> str | None:
        k = int(v // third)
        return None if abs(v - third) < 3 or abs(v - 2 * third) < 3 else names[min(k, 2)]

    col, row = part(x, ("left", "", "right")), part(y, ("top", "", "bottom"))
    if col is None or row is None:
        return None
    return " ".join(w for w in (row, col) if w) or "middle"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _relations(groups: list[dict[str, Any]], rng: random.Random) -> list[str]:
    """Some true relations of a single object to another group: "the red ring is above the green crosses"
    (stated for a group only when it holds for each of its members)."""
    pairs = [(a, b) for a in groups for b in groups if a is not b and a["count"] == 1]
    rng.shuffle(pairs)
    out, said = [], set()
    for a, b in pairs[: rng.randint(min(1, len(pairs)), min(3, len(pairs)))]:
        if (id(b), id(a)) in said:
            continue
        said.add((id(a), id(b)))
        found = {relation(a["boxes"][0], box) for box in b["boxes"]}
        if len(found) > 1:
            continue
        word = rng.choice(RELATIONS[found.pop()])
        target = f"the {b['colour']} {_plural(b['shape'], b['count'])}"
        if rng.random() < 0.5:
            out.append(f"{group_phrase(a, rng, True)} is {word} {target}")
        else:
            out.append(f"there is {_article(a['colour'])} {a['colour']} {a['shape']} {word} {target}")
    return out


def caption_of(scene: dict[str, Any], rng: random.Random, max_words: int = 60) -> str:
    """One caption: the groups in a sentence frame, relations and regions of single objects, background,
    filler to 15-max_words words (the facts alone may run past max_words)."""
    groups = list(scene["groups"])
    rng.shuffle(groups)
    listing = _join([group_phrase(g, rng) for g in groups])
    plural = groups[0]["count"] > 1  # "there is a cat and two dogs"
    background = scene["background"]
    frame = rng.randrange(4)
    if frame == 0:
        sentences = [rng.choice(PREFIXES) + listing + f" on a {background} background"]
    elif frame == 1:
        sentences = [f"on a {background} background there {'are' if plural else 'is'} {listing}"]
    elif frame == 2:
        sentences = [f"{rng.choice(PREFIXES)}{listing}", f"the background is {background}"]
    else:
        sentences = [f"{listing} {'are' if len(groups) > 1 or plural else 'is'} drawn on {background}"]
    sentences += _relations(groups, rng)
    singles = [g for g in groups if g["count"] == 1]
    for g in singles:
        where = region(g["boxes"][0])
        if where and rng.random() < 0.5:
            sentences.append(f"{group_phrase(g, rng, True)} is {WHERE[where]}")
    total = sum(g["count"] for g in groups)
    if total > 1 and rng.random() < 0.4:
        sentences.append(rng.choice((f"there are {NUMBERS[total]} shapes in all",
                                     f"in total there are {NUMBERS[total]} objects")))
    n_words, target = len(" ".join(sentences).split()), rng.randint(15, max(15, max_words))
    for clause in rng.sample(FILLER, len(FILLER)):
        if n_words >= target:
            break
        if n_words + len(clause.split()) <= max_words:
            sentences.append(clause)
            n_words += len(clause.split())
    return ". ".join(s[0].upper() + s[1:] for s in sentences) + "."


# ---------------------------------------------------------------- samples


def scene_sample(rng: np.random.Generator, max_words: int = 60) -> tuple[bytes, str, dict[str, Any]]:
    """(PNG bytes, caption, scene) of one random scene."""
    scene = random_scene(rng)
    text_rng = random.Random(int(rng.integers(2**63)))  # captions draw many small choices: stdlib is handier
    buf = io.BytesIO()
    draw_scene(scene).save(buf, format="PNG")
    return buf.getvalue(), caption_of(scene, text_rng, max_words), scene


def speech(rng: np.random.Generator, caption: str, engine: str = "synthetic") -> tuple[bytes, float]:
    """(WAV bytes, seconds) for a caption: speech-like audio about as long as the caption read aloud, or
    espeak-ng speaking it (engine="espeak", needs espeak-ng and torchaudio)."""
    if engine == "espeak":
        from mot.data.demo import SPEEDS, VOICES, synthesize  # torch and torchaudio: only for this engine

        wav = synthesize(caption, str(rng.choice(VOICES)), int(rng.choice(SPEEDS)))
        return wav_bytes((wav * 32767).astype(np.int16)), len(wav) / 16_000
    if engine != "synthetic":
        raise ValueError(f"speech engine {engine!r}: choose 'synthetic' or 'espeak'")
    seconds = float(np.clip(len(caption.split()) / rng.uniform(*SPEECH_WORDS_PER_SECOND), 1.0, 15.0))
    return wav_bytes(speech_like(rng, seconds)), seconds


def draws_audio(rng: np.random.Generator, task: dict[str, Any]) -> bool:
    """Whether a sample has audio: its first draw, so that a scan can tell without making the sample
    (SyntheticPart.ids_without_reading)."""
    return bool(rng.random() < float(task.get("audio_fraction", 0.0)))


def sample_members(rng: np.random.Generator, task: dict[str, Any]) -> tuple[dict[str, bytes], float]:
    """The members of one tar sample ({"png", "txt"[, "wav"]}) and its audio seconds (0 without audio).
    task options: icon_dir, icon_fraction (0.2), audio_fraction (0.0), speech ("synthetic" or "espeak"),
    speech_max_words (24: a sample with audio gets a shorter caption, so audio documents stay near 512
    tokens with the demo tokenizers' 50 speech units a second)."""
    with_audio = draws_audio(rng, task)
    max_words = task.get("speech_max_words", 24) if with_audio else 60
    icon_dir = task.get("icon_dir")
    if icon_dir and rng.random() < task.get("icon_fraction", 0.2):
        png, caption = icon_theme.icon_sample(rng, icon_theme.cached_icons(icon_dir), max_words)
    else:
        png, caption, _ = scene_sample(rng, max_words)
    members = {"png": png, "txt": caption.encode()}
    seconds = 0.0
    if with_audio:
        members["wav"], seconds = speech(rng, caption, task.get("speech", "synthetic"))
    return members, seconds
