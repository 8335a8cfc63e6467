"""The scaling corpus (mot.data.scenes, mot.data.icons): every fact a caption states is read back from the
image's pixels by code written here (a caption parser, colour masks, a flood fill), not from the generator's
scene; shards are deterministic and read back by the tar reader; icons come from a theme the test writes."""

from __future__ import annotations

import io
import re
import tarfile
import wave
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mot.data import icons, scenes
from mot.data.documents import AudioSegment, ImageSegment, TextSegment
from mot.data.synthetic_docs import write_scenes, write_shards
from mot.data.tar_source import TarDocuments

# The caption vocabulary (what words mean), not the drawing code.
COLOUR = "|".join(scenes.COLOURS)
SHAPE = "|".join(scenes.SHAPES)
NUMBER = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
REL = {"above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below",
       "to the left of": "left", "left of": "left", "to the right of": "right", "right of": "right"}
REL_RE = "|".join(sorted(REL, key=len, reverse=True))
WHERE_RE = "in the top left|in the top right|in the bottom left|in the bottom right|at the top|at the bottom|" \
           "on the left|on the right|in the middle"
GROUP = re.compile(rf"\b(a|an|one|two|three|four) (?:(small|medium|large) )?(?:(solid|striped|dotted|outlined) )?"
                   rf"({COLOUR}) ({SHAPE})(e?s)?\b")
RELATION = re.compile(rf"\b(?:the|there is an?) ({COLOUR}) ({SHAPE}) (?:is )?({REL_RE}) the ({COLOUR}) ({SHAPE})")
REGION = re.compile(rf"\bthe ({COLOUR}) ({SHAPE}) is ({WHERE_RE})\b")
TOTAL = re.compile(r"there are (\w+) shapes in all|in total there are (\w+) objects")
BACKGROUND = re.compile(r"on an? ([a-z]+) background|the background is ([a-z]+)|drawn on ([a-z]+)")


def parse(caption: str) -> dict:
    text = caption.lower()
    groups: dict[str, dict] = {}
    for count, size, texture, colour, shape, plural in GROUP.findall(text):
        stated = {"count": NUMBER[count], "shape": shape}
        if colour in groups:  # "there is a red ring above ..." repeats a group: it must agree
            assert groups[colour]["shape"] == shape and (groups[colour]["count"] == stated["count"] or
                                                         count in ("a", "an")), caption
            continue
        assert (NUMBER[count] > 1) == bool(plural), caption
        groups[colour] = stated | {"size": size or None, "texture": texture or None}
    totals = [NUMBER[a or b] for a, b in TOTAL.findall(text)]
    (background,) = {next(b for b in m if b) for m in BACKGROUND.findall(text)}
    return {"groups": groups, "relations": RELATION.findall(text), "regions": REGION.findall(text),
            "totals": totals, "background": background}


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected pieces of a boolean mask, each as an (n, 2) array of (y, x)."""
    seen = np.zeros_like(mask)
    pieces = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, piece = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            piece.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        queue.append((v, u))
        pieces.append(np.array(piece))
    return pieces


def has_hole(piece: np.ndarray, shape: tuple[int, int]) -> bool:
    """Whether a piece encloses pixels that are not part of it (a flood from the image border misses them)."""
    solid = np.zeros(shape, bool)
    solid[piece[:, 0], piece[:, 1]] = True
    outside = np.zeros((shape[0] + 2, shape[1] + 2), bool)
    free = np.pad(~solid, 1, constant_values=True)
    queue = deque([(0, 0)])
    outside[0, 0] = True
    while queue:
        y, x = queue.popleft()
        for v, u in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):  # 4-connected: no leaks through corners
            if 0 <= v < free.shape[0] and 0 <= u < free.shape[1] and free[v, u] and not outside[v, u]:
                outside[v, u] = True
                queue.append((v, u))
    return bool((free & ~outside).any())


def measure(pixels: np.ndarray) -> dict[str, list[dict]]:
    """Per palette colour in the image: its pieces' bounding boxes, centres and fill."""
    found = {}
    white = (pixels == scenes.PATTERN).all(-1)
    for name, rgb in scenes.COLOURS.items():
        mask = (pixels == rgb).all(-1)
        if not mask.any():
            continue
        found[name] = []
        for piece in components(mask):
            (y0, x0), (y1, x1) = piece.min(0), piece.max(0)
            body = mask[y0 : y1 + 1, x0 : x1 + 1] | white[y0 : y1 + 1, x0 : x1 + 1]
            found[name].append({"centre": ((x0 + x1) / 2, (y0 + y1) / 2), "side": max(x1 - x0, y1 - y0) + 1,
                                "fill": body.mean(), "hole": has_hole(piece, mask.shape),
                                "white": bool(white[y0 : y1 + 1, x0 : x1 + 1].any())})
    return found


def check_caption_against_pixels(png: bytes, caption: str) -> dict:
    stated = parse(caption)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert pixels.shape == (64, 64, 3)
    values, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    assert tuple(values[counts.argmax()]) == scenes.BACKGROUNDS[stated["background"]], caption
    seen = measure(pixels)
    assert set(seen) == set(stated["groups"]), caption  # every colour drawn is named, and only those
    for colour, group in stated["groups"].items():
        pieces = seen[colour]
        assert len(pieces) == group["count"], caption
        for p in pieces:
            if group["size"]:
                lo, hi = scenes.SIZES[group["size"]]
                assert lo - 3 <= p["side"] <= hi, (caption, p)  # stars and hexagons are a little short
            texture = group["texture"] or "solid"
            assert p["white"] == (texture in ("striped", "dotted")), caption
            if group["shape"] == "ring" or (texture == "outlined" and group["shape"] in ("circle", "square")):
                assert p["hole"], caption
            if texture == "solid" and group["shape"] in ("circle", "square", "diamond", "triangle"):
                assert not p["hole"], caption
            if texture != "outlined" and group["shape"] == "square":
                assert p["fill"] > 0.95, caption
            if texture != "outlined" and group["shape"] in ("triangle", "diamond", "star"):
                assert p["fill"] < 0.7, caption
    for a_colour, _, word, b_colour, _ in stated["relations"]:
        (a,) = seen[a_colour]
        for b in seen[b_colour]:
            dx, dy = a["centre"][0] - b["centre"][0], a["centre"][1] - b["centre"][1]
            assert {"above": dy < 0, "below": dy > 0, "left": dx < 0, "right": dx > 0}[REL[word]], caption
    for colour, _, where in stated["regions"]:
        (piece,) = seen[colour]
        x, y = piece["centre"]
        column = "left" if x < 64 / 3 else "right" if x > 128 / 3 else "centre"
        row = "top" if y < 64 / 3 else "bottom" if y > 128 / 3 else "middle"
        expected = {"in the middle": ("centre", "middle"), "at the top": ("centre", "top"),
                    "at the bottom": ("centre", "bottom"), "on the left": ("left", "middle"),
                    "on the right": ("right", "middle")}.get(where) or (where.split()[-1], where.split()[-2])
        assert (column, row) == expected, caption
    for total in stated["totals"]:
        assert total == sum(len(p) for p in seen.values()), caption
    return stated


def test_every_stated_fact_of_a_scene_is_true_of_its_pixels():
    tally = {"relations": 0, "regions": 0, "totals": 0, "textures": set(), "shapes": set(), "counts": set()}
    lengths = []
    for index in range(200):
        png, caption, _ = scenes.scene_sample(np.random.default_rng([7, index]))
        stated = check_caption_against_pixels(png, caption)
        lengths.append(len(caption.split()))
        for key in ("relations", "regions", "totals"):
            tally[key] += len(stated[key])
        for g in stated["groups"].values():
            tally["textures"].add(g["texture"])
            tally["shapes"].add(g["shape"])
            tally["counts"].add(g["count"])
    # The checks above ran on every kind of fact, not on a lucky few.
    assert min(tally["relations"], tally["regions"], tally["totals"]) >= 30
    assert tally["textures"] >= {"solid", "striped", "dotted", "outlined"} and tally["shapes"] == set(scenes.SHAPES)
    assert tally["counts"] >= {1, 2, 3}
    assert min(lengths) >= 15 and np.percentile(lengths, 95) <= 60 and max(lengths) <= 80


def test_the_checker_catches_a_false_caption():
    """A wrong colour, a flipped relation, a wrong count: each is caught (the checker is not vacuous)."""
    flips = {" above the ": " below the ", " below the ": " above the ", " left of the ": " right of the ",
             " right of the ": " left of the "}
    lies = {"colour": 0, "relation": 0, "count": 0}
    for index in range(40):
        png, caption, scene = scenes.scene_sample(np.random.default_rng([7, index]))
        colour = scene["groups"][0]["colour"]
        other = next(c for c in scenes.COLOURS if c not in {g["colour"] for g in scene["groups"]})
        false = {"colour": caption.replace(colour, other)}
        flip = next((w for w in flips if w in caption), None)
        if flip:
            false["relation"] = caption.replace(flip, flips[flip], 1)
        if "wo " in caption:
            false["count"] = caption.replace("Two ", "Three ", 1).replace("two ", "three ", 1)
        for kind, text in false.items():
            with pytest.raises(AssertionError):
                check_caption_against_pixels(png, text)
            lies[kind] += 1
    assert min(lies.values()) >= 5


def test_relation_words_follow_the_centres():
    assert scenes.relation((0, 0, 9, 9), (0, 30, 9, 39)) == "above"
    assert scenes.relation((40, 2, 49, 11), (0, 0, 9, 9)) == "right of"
    assert scenes.region((1, 1, 10, 10)) == "top left" and scenes.region((27, 27, 36, 36)) == "middle"
    assert scenes.region((17, 1, 26, 10)) is None  # centre 21.5: too near a third to name


def _write_theme(root):
    """A tiny freedesktop theme: SIZE/CONTEXT/NAME.png, plus icons the reader must leave out."""
    def icon(path, side, rgb):
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGBA", (side, side), (0, 0, 0, 0))  # transparent: the background shows
        image.paste((*rgb, 255), (side // 4, side // 4, side * 3 // 4, side * 3 // 4))
        image.save(path)

    icon(root / "48x48/devices/printer.png", 48, (200, 0, 0))
    icon(root / "64x64/devices/printer.png", 64, (200, 0, 0))  # nearer 64 px: this one is kept
    icon(root / "48x48/places/folder-documents.png", 48, (0, 0, 200))
    icon(root / "apps/48/accessories-text-editor.png", 48, (0, 150, 0))  # CONTEXT/SIZE layout
    icon(root / "16x16/apps/tiny.png", 16, (0, 0, 0))  # too small
    icon(root / "48x48/places/folder-symbolic.symbolic.png", 48, (0, 0, 0))  # a one-colour glyph


def test_icons_are_read_from_a_theme_folder_and_captioned_from_their_names(tmp_path):
    _write_theme(tmp_path)
    found = icons.find_icons(tmp_path)
    assert {(i.context, i.name, i.size) for i in found} == {
        ("devices", "printer", 64), ("places", "folder documents", 48), ("apps", "accessories text editor", 48)}
    for index in range(20):
        png, caption = icons.icon_sample(np.random.default_rng([1, index]), found)
        pixels = np.asarray(Image.open(io.BytesIO(png)))
        background = max((b for b in icons.BACKGROUNDS if f"{b} background" in caption), key=len)
        assert pixels.shape == (64, 64, 3) and 15 <= len(caption.split()) <= 45
        assert tuple(pixels.reshape(-1, 3)[np.abs(pixels.reshape(-1, 3).astype(int) - icons.BACKGROUNDS[background])
                                           .sum(1).argmin()]) == icons.BACKGROUNDS[background]
        (icon,) = [i for i in found if i.name in caption]
        rgb = {"printer": (200, 0, 0), "folder documents": (0, 0, 200), "accessories text editor": (0, 150, 0)}
        assert (np.abs(pixels.astype(int) - rgb[icon.name]).sum(-1) < 30).sum() >= 60  # the icon's square
    with pytest.raises(FileNotFoundError, match="no PNG icons"):
        icons.cached_icons(tmp_path / "48x48" / "places" / "nothing")


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_scene_shards_are_deterministic_and_read_back_as_documents(tmp_path):
    _write_theme(tmp_path / "theme")
    options = {"audio_fraction": 0.4, "icon_dir": str(tmp_path / "theme"), "icon_fraction": 0.3}
    first = write_shards("scenes", tmp_path / "a", samples=24, per_tar=10, seed=3, **options)
    again = write_shards("scenes", tmp_path / "b", samples=24, per_tar=10, seed=3, **options)
    assert [r["samples"] for r in first] == [10, 10, 4]
    for a, b in zip(first, again, strict=True):
        assert Path(a["path"]).read_bytes() == Path(b["path"]).read_bytes()
    members = {k: v for r in first for k, v in _members(r["path"]).items()}
    keys = sorted({name.split(".")[0] for name in members})
    assert len(keys) == 24 and all(f"{k}.png" in members and f"{k}.txt" in members for k in keys)
    icon_keys = [k for k in keys if b"icon" in members[f"{k}.txt"]]
    assert 0 < len(icon_keys) < 24
    for k in keys:  # scenes are checked; icons only have to be 64 px
        caption = members[f"{k}.txt"].decode()
        if k not in icon_keys:
            check_caption_against_pixels(members[f"{k}.png"], caption)
        if f"{k}.wav" in members:
            with wave.open(io.BytesIO(members[f"{k}.wav"])) as w:
                seconds = w.getnframes() / w.getframerate()
            words = len(caption.split())
            assert w.getframerate() == 16_000  # spoken at 2.2-3.2 words a second, clipped to 1-15 s
            assert min(15.0, words / 3.2) - 0.01 <= seconds <= max(1.0, words / 2.2) + 0.01
    audio = sum(f"{k}.wav" in members for k in keys)
    assert 0 < audio == sum(r["audio"] for r in first)

    docs = list(TarDocuments(tmp_path / "a"))
    assert len(docs) == 2 * (24 + audio)  # each medium in both orders
    by_id = {d.id: d for d in docs}
    doc = by_id[f"scenes-00000/{keys[0]}#text-image"]
    text, image = doc.segments
    assert isinstance(text, TextSegment) and text.text == members[f"{keys[0]}.txt"].decode()
    assert isinstance(image, ImageSegment) and image.data.read_bytes() == members[f"{keys[0]}.png"]
    assert all(isinstance(d.segments[0], AudioSegment) for d in docs if d.id.endswith("#audio-text"))


def test_write_scenes_refuses_an_icon_folder_without_icons(tmp_path):
    with pytest.raises(FileNotFoundError, match="no usable PNG icons"):
        write_scenes(tmp_path / "out", samples=2, icon_dir=tmp_path)
