"""Ops per eager decoding step (issue 22): what an eager `CachedDecoder.step` dispatches, by op and by source line.

    python bench/decode_ops.py [--recipe recipes/paper/chameleon_1_5b.toml] [--dim 128] [--heads 4] [--log TAG]
    python bench/decode_ops.py --smoke      # a 2-layer model: checks the script

An eager decoding step is bound by its host time, which goes with the number of ops it dispatches (on an H200
the bench model's eager text step ran 966 kernel launches in 24 ms of host time: bench/NOTES.md). The count
depends on the recipe's depth and structure, not its width, so it is measured here at a small width on the
CPU, with the model in bf16 as `mot generate` runs it, one text token per step after an 8-token prompt. Views
(reshapes, slices) launch no kernel and are counted apart. On the CPU some ops decompose into several (rms_norm
into 8, where CUDA has one fused kernel), so this counts dispatched ops, an upper bound on a GPU's launches.
--log writes the report to bench/results/decode_ops_<TAG>_<date>.txt.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mot.config import load_config  # noqa: E402
from mot.generate.decoder import CachedDecoder  # noqa: E402
from mot.model import MoTTransformer  # noqa: E402

VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "slice", "select", "unsqueeze", "squeeze", "permute",
         "as_strided", "alias", "detach", "split", "split_with_sizes", "unbind", "reshape", "_reshape_alias",
         "chunk", "narrow", "unflatten", "flatten"}


class CountOps(TorchDispatchMode):
    """Counts every dispatched aten op, and where in mot/ it came from (the innermost mot/ frame)."""

    def __init__(self):
        super().__init__()
        self.by_op: collections.Counter = collections.Counter()
        self.by_line: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.by_op[name] += 1
        if name not in VIEWS:
            frames = [f for f in traceback.extract_stack() if f"{ROOT}/mot/" in f.filename]
            where = f"{Path(frames[-1].filename).relative_to(ROOT)}:{frames[-1].lineno}" if frames else "?"
            self.by_line[(where, name)] += 1
        return func(*args, **(kwargs or {}))


def count_step(recipe: str, dim: int, heads: int, layers: int | None) -> tuple[CountOps, int]:
    overrides = [f"--model.dim={dim}", f"--model.n_heads={heads}"] + ([f"--model.n_layers={layers}"] if layers else [])
    cfg = load_config(recipe, overrides).model
    for modality in cfg.modalities:  # the vocabulary's size changes no op count
        modality.vocab_size = min(modality.vocab_size, 256)
    torch.manual_seed(0)
    model = MoTTransformer(cfg).to(torch.bfloat16).eval()
    decoder = CachedDecoder(model, rows=1, max_len=64)
    text = 10  # a text id: the step's rows sit in one tower
    with torch.no_grad():
        decoder.prefill(torch.full((1, 8), text), torch.arange(8)[None], torch.ones(1, 8, dtype=torch.bool))
        decoder.step([text], [8], [True])  # the first step after the prompt, out of the count
        counter = CountOps()
        with counter:
            decoder.step([text], [9], [True])
    return counter, cfg.n_layers


def report(counter: CountOps, layers: int, args: argparse.Namespace) -> str:
    views = sum(n for op, n in counter.by_op.items() if op in VIEWS)
    total = sum(counter.by_op.values())
    lines = [f"{args.recipe} at dim {args.dim}, {layers} layers, bf16, CPU, torch {torch.__version__}",
             f"one eager text step: {total} ops, {total - views} not views ({(total - views) / layers:.1f} per "
             f"layer), {views} views", "", f"{'op':34s} {'count':>6s}"]
    lines += [f"{op:34s} {n:6d}{'  (view)' if op in VIEWS else ''}" for op, n in counter.by_op.most_common(args.top)]
    by_line: collections.Counter = collections.Counter()
    for (where, _), n in counter.by_line.items():
        by_line[where] += n
    lines += ["", f"{'source line (not views)':40s} {'count':>6s}  ops"]
    for where, n in by_line.most_common(args.top):
        ops = ", ".join(f"{op} x{c}" for (w, op), c in counter.by_line.items() if w == where)
        lines.append(f"{where:40s} {n:6d}  {ops}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "paper" / "chameleon_1_5b.toml"))
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--top", type=int, default=16)
    parser.add_argument("--log", default=None, help="write the report to bench/results/decode_ops_<TAG>_<date>.txt")
    parser.add_argument("--smoke", action="store_true", help="2 layers: checks the script in seconds")
    args = parser.parse_args()
    counter, layers = count_step(args.recipe, args.dim, args.heads, 2 if args.smoke else None)
    text = report(counter, layers, args)
    print(text, end="")
    if args.log:
        path = ROOT / "bench" / "results" / f"decode_ops_{args.log}_{datetime.date.today()}.txt"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
