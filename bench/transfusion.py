"""Transfusion against Chameleon setting on one GPU, side by side: the same model size, data and batches,
images as diffusion over VQGAN latents in one run and as next-token codes in the other.

    python3 bench/transfusion.py [--steps 600] [--out /tmp/mot_transfusion] [--copy-to DIR] [--json OUT]
    python3 bench/transfusion.py --smoke   # CPU, under a minute: a tiny model on a small demo corpus

Trains recipes/demo_gpu.toml (all `ar`) and recipes/demo_transfusion_gpu.toml (image `diffusion`) through
`mot train` (bf16, one process, the same seed), then runs the demo's text -> image colour check on each
checkpoint (`mot.generate.demo_eval`: 48 captions "a <colour> <shape> in the center", guidance 3, the
generated image's dominant colour against the named one) and times it. Prints, per run: median ms per
optimizer step after warm-up (from the trainer's tokens/s windows: same tokens per step in both), MFU,
final eval losses per modality (image: cross-entropy for `ar`, noise MSE for `diffusion`: not comparable),
colour match, and seconds for the colour check (48 guided images, eager, checkpoint load included).
--copy-to gets each run's colour grid, samples page, loss plot and log, and the JSON of the whole table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from multi_gpu import launch  # noqa: E402

RUNS = {"ar": "recipes/demo_gpu.toml", "diffusion": "recipes/demo_transfusion_gpu.toml"}
# --smoke: the same recipes with a tiny model, max_seq_len leaving room for the samples page's longest request
SMOKE_OVERRIDES = ["--model.dim=32", "--model.n_layers=2", "--model.n_heads=2", "--model.max_seq_len=256",
                   "--train.seq_len=128", "--train.batch_size=4", "--train.micro_batch_size=2",
                   "--train.warmup_steps=1", "--train.log_every=1", "--train.eval_every=4", "--train.eval_batches=1",
                   "--train.checkpoint_every=4"]


def smoke_corpus(folder: Path) -> list[str]:
    """A small demo corpus (no speech) in `folder`, and the overrides that train the tiny model on it."""
    from mot.data.demo import generate_demo_corpus

    generate_demo_corpus(folder / "corpus", scale=0.02, speech=False, progress=False)
    return [*SMOKE_OVERRIDES, f"--data.documents={folder / 'corpus' / 'documents.jsonl'}",
            f"--data.shards={folder / 'shards'}"]


def colour_check(run_dir: Path, per_colour: int) -> dict:
    import torch

    from mot.generate.demo_eval import write_demo_samples

    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    report = write_demo_samples(run_dir, per_colour=per_colour)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    report["seconds"] = time.perf_counter() - start
    return report


def compare(args: argparse.Namespace) -> int:
    """Train and check both runs, then print their table."""
    rows = []
    for objective, recipe in RUNS.items():
        args.recipe = recipe
        result = launch(f"tf-{objective}", "1", [], args)
        if not result["ok"]:
            return 1
        run_dir = Path(args.out) / f"tf-{objective}"
        tokens_per_step = run_dir_tokens(run_dir)
        steady = [r["tokens_per_s"] for r in result["train"] if r["step"] > args.steps // 5]
        ms = [1000 * tokens_per_step / t for t in steady]
        last_eval = result["eval"][-1] if result["eval"] else {}
        report = colour_check(run_dir, args.per_colour)
        rows.append({"objective": objective, "recipe": recipe, "ms_per_step": statistics.median(ms),
                     "ms_min": min(ms), "ms_max": max(ms), "mfu": result["mfu"], "wall_s": result["wall_s"],
                     "eval": {k: v for k, v in last_eval.items() if k.startswith("loss")},
                     "colour_match": report["rate"], "chance": report["chance"], "images": report["images"],
                     "generate_s": report["seconds"], "grid": report["grid"], "pages": report["pages"]})
        if args.copy_to:
            dest = Path(args.copy_to) / objective
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("samples", "log.jsonl", "loss_curves.png", "config.json", "summary.json"):
                src = run_dir / name
                if src.is_dir():
                    shutil.copytree(src, dest / name, dirs_exist_ok=True)
                elif src.exists():
                    shutil.copy2(src, dest / name)

    base = rows[0]["ms_per_step"]
    print(f"\n{'objective':<11}{'ms/step':>9}{'(min-max)':>16}{'x ar':>7}{'MFU':>7}{'eval text':>11}{'eval image':>12}"
          f"{'eval speech':>13}{'colour':>8}{'gen s':>7}")
    for r in rows:
        e, spread = r["eval"], f"({r['ms_min']:.1f}-{r['ms_max']:.1f})"
        print(f"{r['objective']:<11}{r['ms_per_step']:>9.1f}{spread:>16}"
              f"{r['ms_per_step'] / base:>7.3f}{100 * r['mfu']:>6.1f}%{e.get('loss/text', float('nan')):>11.4f}"
              f"{e.get('loss/image', float('nan')):>12.4f}{e.get('loss/speech', float('nan')):>13.4f}"
              f"{100 * r['colour_match']:>7.1f}%{r['generate_s']:>7.1f}")
    print(f"colour match: {rows[0]['images']} captions, chance {100 * rows[0]['chance']:.1f}%; image eval loss is "
          "cross-entropy (ar) or noise MSE (diffusion)")
    table = json.dumps(rows, indent=1)
    if args.json:
        Path(args.json).write_text(table)
    if args.copy_to:
        (Path(args.copy_to) / "transfusion.json").write_text(table)
    return 0


def run_dir_tokens(run_dir: Path) -> int:
    """Tokens per optimizer step of the run, from the config it saved."""
    train = json.loads((run_dir / "config.json").read_text())["train"]
    return train["batch_size"] * train["seq_len"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default="/tmp/mot_transfusion")
    parser.add_argument("--copy-to", default="", help="copy grids, pages, plots and logs here")
    parser.add_argument("--json", default="", help="write the table here")
    parser.add_argument("--per-colour", type=int, default=8, help="captions per colour in the colour check")
    parser.add_argument("--smoke", action="store_true", help="tiny model, small corpus, CPU: checks the script")
    args, args.overrides = parser.parse_known_args()
    if not args.smoke:
        return compare(args)
    with tempfile.TemporaryDirectory(prefix="mot-transfusion-") as folder:
        args.out, args.steps, args.per_colour = str(Path(folder) / "out"), 4, 2
        args.overrides = smoke_corpus(Path(folder)) + args.overrides
        return compare(args)


if __name__ == "__main__":
    sys.exit(main())
