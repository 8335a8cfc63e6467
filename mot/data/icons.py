"""Real images for the scaling corpus: PNG icons of an unpacked icon theme, on a background, captioned from
their file name and the theme's context folder ("a printer icon, a device, on a grey background").

A theme lays out `SIZE/CONTEXT/NAME.png` (freedesktop: `48x48/devices/printer.png`, as Oxygen, Adwaita,
Tango and hicolor do) or `CONTEXT/SIZE/NAME.png`; both are read. Symbolic icons (one-colour glyphs) and
sizes under 32 px are left out; of each (context, name) the size nearest 64 px is kept. The study uses
Debian's `oxygen-icon-theme` (LGPL-3+; ~1,400 full-colour icons at 48 px, ~820 at 64 px):

    apt-get download oxygen-icon-theme && dpkg -x oxygen-icon-theme_*.deb icons/
    find_icons("icons/usr/share/icons/oxygen/base")
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 64
MIN_SIZE = 32
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 248), "grey": (200, 200, 200), "dark grey": (70, 70, 70), "cream": (248, 240, 215),
    "pale blue": (215, 230, 250), "pale green": (215, 245, 225), "black": (15, 15, 15)}
CONTEXTS = {"actions": "a button for an action", "apps": "an application", "applications": "an application",
            "categories": "a menu category", "devices": "a device", "emblems": "an emblem", "emotes": "a face",
            "mimetypes": "a type of file", "places": "a place in the file manager", "status": "a status sign"}
DROP_WORDS = {"x", "symbolic", "generic"}  # "application-x-generic" -> "application"
FILLER = ("from a desktop icon theme", "drawn with soft shading", "the kind of picture a computer shows in a menu",
          "made to be seen at a small size", "with a little depth to it", "in the middle of an empty square",
          "as it would appear on a screen", "with clean edges", "designed for a free desktop")
_SIZE = re.compile(r"^(\d+)(?:x\d+)?(?:@\d+x?)?$")


@dataclass(frozen=True)
class Icon:
    path: Path
    name: str  # the words of its file name: "drive removable media"
    context: str  # the folder it sits in: "devices" ("" when none)
    size: int


def _size_and_context(parts: tuple[str, ...]) -> tuple[int, str] | None:
    """(pixel size, context) from the folders above an icon, or None without a numeric size folder."""
    for i, part in enumerate(parts):
        m = _SIZE.match(part)
        if m:
            others = [p for p in parts[i + 1 :] + parts[max(0, i - 1) : i] if not _SIZE.match(p)]
            return int(m.group(1)), (others[0] if others else "")
    return None


def icon_words(stem: str) -> str:
    words = [w for w in re.split(r"[-_.\s]+", stem.lower()) if w and w not in DROP_WORDS]
    return " ".join(words)


def find_icons(root: str | Path, target: int = IMAGE_SIZE) -> list[Icon]:
    """The usable icons under root, one per (context, name), each at the size nearest `target`; sorted by path
    so a seed picks the same icon on every machine that has the same theme."""
    root = Path(root)
    best: dict[tuple[str, str], Icon] = {}
    for path in sorted(root.rglob("*.png")):
        if "symbolic" in path.name:
            continue
        found = _size_and_context(path.relative_to(root).parts[:-1])
        name = icon_words(path.stem)
        if found is None or found[0] < MIN_SIZE or not name:
            continue
        icon = Icon(path, name, found[1], found[0])
        key = (icon.context, name)
        if key not in best or abs(icon.size - target) < abs(best[key].size - target):
            best[key] = icon
    return sorted(best.values(), key=lambda i: str(i.path))


_CACHE: dict[str, list[Icon]] = {}  # per process: a theme's listing is read once per writer


def cached_icons(root: str | Path) -> list[Icon]:
    key = str(root)
    if key not in _CACHE:
        _CACHE[key] = find_icons(root)
        if not _CACHE[key]:
            raise FileNotFoundError(f"{root}: no PNG icons of {MIN_SIZE} px or more in SIZE/CONTEXT/NAME.png "
                                    "folders (unpack an icon theme .deb with dpkg -x, see mot.data.icons)")
    return _CACHE[key]


def icon_image(icon: Icon, background: tuple[int, int, int], side: int, offset: tuple[int, int]) -> Image.Image:
    """The icon scaled so its longer side is `side`, alpha-composited onto a 64 px background at offset."""
    with Image.open(icon.path) as im:
        rgba = im.convert("RGBA")
    scale = side / max(rgba.size)
    rgba = rgba.resize((max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale))),
                       Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (IMAGE_SIZE, IMAGE_SIZE), (*background, 255))
    canvas.alpha_composite(rgba, offset)
    return canvas.convert("RGB")


def icon_caption(icon: Icon, background: str, rng: np.random.Generator, max_words: int = 40) -> str:
    """"An icon of drive removable media, a device, on a pale blue background. ..." + filler to 15-max_words."""
    article = "an" if icon.name[0] in "aeiou" else "a"
    kind = CONTEXTS.get(icon.context)
    frame = int(rng.integers(3))
    if frame == 0:
        first = f"an icon of {icon.name}" + (f", {kind}," if kind else "") + f" on a {background} background"
    elif frame == 1:
        first = f"{article} {icon.name} icon on a {background} background" + (f". It stands for {kind}" if kind else "")
    else:
        first = f"on a {background} background, the icon for {icon.name}" + (f", which shows {kind}" if kind else "")
    words = first.split()
    target = int(rng.integers(15, max(15, max_words) + 1))
    for i in rng.permutation(len(FILLER)):
        if len(words) >= target:
            break
        words += ["."] + FILLER[i].split()
    sentences = [s.strip() for s in " ".join(words).replace(" .", ".").split(".") if s.strip()]
    return ". ".join(s[0].upper() + s[1:] for s in sentences) + "."


def icon_sample(rng: np.random.Generator, icons: list[Icon], max_words: int = 40) -> tuple[bytes, str]:
    """(PNG bytes, caption) of one icon from `icons` on a random background, at 36-60 px, placed at random."""
    icon = icons[int(rng.integers(len(icons)))]
    background = str(rng.choice(list(BACKGROUNDS)))
    side = int(rng.integers(36, 61))
    offset = tuple(int(v) for v in rng.integers(0, IMAGE_SIZE - side + 1, 2))
    buf = io.BytesIO()
    icon_image(icon, BACKGROUNDS[background], side, offset).save(buf, format="PNG")
    return buf.getvalue(), icon_caption(icon, background, rng, max_words)
