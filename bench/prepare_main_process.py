"""What `mot prepare`'s main process costs per document in CUDA mode, on any machine: the CUDA-mode loop
(workers read the tars and decode, this process encodes, assembles and writes) with the media encoding
replaced by zeros, so no GPU is needed and only the main process's own work is left. Profiled with cProfile.

    python bench/prepare_main_process.py --samples 4000 --workers 2 [--log TAG]
    python bench/prepare_main_process.py --smoke    # 40 samples, seconds: checks the script

Prints main-process CPU seconds per document (wall time less the time spent waiting for workers) and the
functions that take most of it; with --log, writes the report to bench/results/prepare_main_<TAG>_<date>.txt.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mot.config import load_config  # noqa: E402
from mot.data import encode, pipeline  # noqa: E402
from mot.data.prepare import prepare_for_recipe  # noqa: E402
from mot.data.synthetic_docs import write_shards  # noqa: E402


def zeros_for_media(self, chunk):
    """MediaEncoder.submit's output shapes with no encoding: codes of an 8x downsampling VQGAN, one unit a row."""
    codes = {s: torch.zeros(b.shape[0], (s[0] // 8) * (s[1] // 8), dtype=torch.long) for s, b in chunk.images.items()}
    units = torch.zeros(chunk.features.shape[0], dtype=torch.long) if chunk.features is not None else None
    return {"codes": codes, "units": units}


def profile_prepare(folder: Path, args: argparse.Namespace) -> str:
    """Prepare the samples written into `folder` under cProfile; the report."""
    write_shards("demo", folder / "tars", samples=args.samples, per_tar=1000, workers=args.workers,
                 audio_fraction=0.1)
    pipeline.ChunkLoop.encodes_here = lambda self: True  # CUDA mode's loop: this process encodes
    encode.MediaEncoder.submit = zeros_for_media
    cfg = load_config(ROOT / "recipes" / "demo.toml", [])
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    stats = prepare_for_recipe(cfg, "recipes/demo.toml", folder / "tars", ROOT / "tokenizers" / "demo",
                               folder / "out", workers=args.workers, shard_size=1000, device="cpu")
    profiler.disable()
    wall = time.perf_counter() - start
    waited = stats.profile["wait_decode"]
    out = io.StringIO()
    out.write(f"{stats.documents} documents, {stats.tokens} tokens, {args.workers} workers, wall {wall:.1f}s, "
              f"waiting for workers {waited:.1f}s\n")
    out.write(f"main process: {(wall - waited) / stats.documents * 1e6:.0f} us per document "
              f"(wall less waiting; includes start-up)\n\n")
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4000, help="demo samples (about 2.2 documents each)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--log", default=None, help="write the report to bench/results/prepare_main_<TAG>_<date>.txt")
    parser.add_argument("--smoke", action="store_true", help="40 samples: checks the script in seconds")
    args = parser.parse_args()
    if args.smoke:
        args.samples = 40
    with tempfile.TemporaryDirectory(prefix="mot-prepare-main-") as folder:
        report = profile_prepare(Path(folder), args)
    print(report)
    if args.log:
        path = ROOT / "bench" / "results" / f"prepare_main_{args.log}_{datetime.date.today()}.txt"
        path.write_text(report)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
