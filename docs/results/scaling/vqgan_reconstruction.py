"""How well the demo VQGAN (trained on the flat shapes of the demo corpus) keeps the scaling corpus's images.

    python docs/results/scaling/vqgan_reconstruction.py [--samples 200] [--icons data/icons/usr/share/icons/oxygen/base]
        [--out docs/results/scaling/vqgan_reconstruction]

The study's image loss is the model's next-code loss on these codes, so what the codes cannot hold no model can
learn, and how much of an image they hold bounds what MoT's image tower can gain. Per kind of image (the demo's
own shapes, the scenes, the icons; seed 7, never in any shard): PSNR and mean absolute error of the round trip
through the codes (encode, decode), on 0-255 RGB; the share of the 512 codes used and the perplexity of their
use (how spread it is); a PNG grid of originals above their reconstructions; the numbers as JSON. On the CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[3]  # the repository


def demo_images(n: int, seed: int) -> list[Image.Image]:
    from mot.data.demo import BACKGROUNDS, draw_scene, random_scene

    rng = random.Random(seed)
    return [draw_scene(random_scene(rng), rng, rng.choice(sorted(BACKGROUNDS))) for _ in range(n)]


def scene_images(n: int, seed: int) -> list[Image.Image]:
    from mot.data.scenes import scene_sample

    rng = np.random.default_rng([seed, 1])
    return [Image.open(io.BytesIO(scene_sample(rng)[0])).convert("RGB") for _ in range(n)]


def icon_images(n: int, seed: int, icon_dir: Path) -> list[Image.Image]:
    from mot.data.icons import cached_icons, icon_sample

    icons = cached_icons(icon_dir)
    rng = np.random.default_rng([seed, 2])
    return [Image.open(io.BytesIO(icon_sample(rng, icons)[0])).convert("RGB") for _ in range(n)]


def round_trip(tokenizer, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Originals and reconstructions as (N, H, W, 3) uint8, and the codes (N, h*w)."""
    batch = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 255 for im in images])
    codes = tokenizer.encode(batch)
    decoded = tokenizer.decode(codes)
    to_uint8 = lambda t: (t.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return to_uint8(batch), to_uint8(decoded), codes.numpy()


def measures(original: np.ndarray, decoded: np.ndarray, codes: np.ndarray, vocab: int) -> dict:
    error = original.astype(np.float64) - decoded.astype(np.float64)
    mse = (error ** 2).reshape(len(error), -1).mean(1)
    psnr = 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))
    counts = np.bincount(codes.reshape(-1), minlength=vocab)
    p = counts[counts > 0] / counts.sum()
    return {"images": len(original), "psnr_mean": float(psnr.mean()), "psnr_median": float(np.median(psnr)),
            "psnr_p10": float(np.percentile(psnr, 10)), "mean_abs_error": float(np.abs(error).mean()),
            "codes_used": int((counts > 0).sum()), "code_perplexity": float(math.exp(-(p * np.log(p)).sum()))}


def grid(rows: list[tuple[str, np.ndarray, np.ndarray]], per_row: int, out: Path) -> None:
    """For each kind: a row of originals above a row of their reconstructions."""
    side = rows[0][1].shape[1]
    canvas = Image.new("RGB", (per_row * (side + 2), len(rows) * 2 * (side + 2)), (255, 255, 255))
    for r, (_, original, decoded) in enumerate(rows):
        for c in range(per_row):
            for k, images in enumerate((original, decoded)):
                canvas.paste(Image.fromarray(images[c]), (c * (side + 2), (2 * r + k) * (side + 2)))
    canvas.resize((canvas.width * 3, canvas.height * 3), Image.NEAREST).save(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tokenizer", default=str(ROOT / "tokenizers" / "demo" / "image"))
    parser.add_argument("--icons", default=str(ROOT / "data" / "icons" / "usr" / "share" / "icons" / "oxygen" / "base"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "scaling" / "vqgan_reconstruction"))
    args = parser.parse_args()
    from mot.tokenize.image import ImageTokenizer

    torch.manual_seed(0)
    tokenizer = ImageTokenizer.load(args.tokenizer).eval()
    kinds = {"demo shapes (its training data)": demo_images(args.samples, args.seed),
             "scenes": scene_images(args.samples, args.seed)}
    if Path(args.icons).is_dir():
        kinds["icons"] = icon_images(args.samples, args.seed, Path(args.icons))
    else:
        print(f"no icons at {args.icons} (see docs/results/scaling/README.md to fetch them): left out")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report, rows = {}, []
    for kind, images in kinds.items():
        original, decoded, codes = round_trip(tokenizer, images)
        report[kind] = measures(original, decoded, codes, tokenizer.vocab_size)
        rows.append((kind, original, decoded))
    grid(rows, per_row=12, out=out / "grid.png")
    (out / "report.json").write_text(json.dumps({"args": vars(args), "kinds": report}, indent=1))
    print(f"{'kind':<34}{'PSNR mean':>10}{'median':>8}{'p10':>7}{'MAE':>7}{'codes used':>12}{'perplexity':>11}")
    for kind, m in report.items():
        print(f"{kind:<34}{m['psnr_mean']:>10.2f}{m['psnr_median']:>8.2f}{m['psnr_p10']:>7.2f}"
              f"{m['mean_abs_error']:>7.2f}{m['codes_used']:>12}{m['code_perplexity']:>11.1f}")
    print(f"written: {out / 'grid.png'}, {out / 'report.json'} (rows of the grid: originals, then reconstructions, "
          f"per kind in the order above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
