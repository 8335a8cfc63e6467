"""1 GPU against 2 GPUs (DDP and FSDP2) on the same recipe: loss curves and tokens/s, side by side
(and the one-GPU options torch.compile and activation checkpointing, which must not change the curve).

    python3 bench/multi_gpu.py [--recipe recipes/demo_gpu.toml] [--steps 300] [--out DIR] [--variants ...]
    python3 bench/multi_gpu.py --smoke   # CPU, seconds: a tiny model and corpus, 1 process against 2 (gloo DDP)

Every run sees the same global batches (the loader packs one global stream and each process takes its rows),
so the curves differ only by bf16 arithmetic and reduction order. Runs one after the other on this machine,
then prints per-step loss differences and the median tokens/s of each run after warm-up.
NVLink multicast stays off: NCCL_NVLS_ENABLE=0 and friends are kept (set if missing) for every launch.
The smoke leaves out FSDP: on the CPU accelerate runs its plugin as plain DDP, so it would test nothing more.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

VARIANTS = {
    "1gpu": ["1", []],
    "2gpu-ddp": ["2", ["--train.distributed=ddp"]],
    "2gpu-fsdp": ["2", ["--train.distributed=fsdp"]],
    "1gpu-compile": ["1", ["--train.compile=true"]],
    "1gpu-actckpt": ["1", ["--train.activation_checkpointing=true"]],
    # Attention backends at this small size (host-bound): SDPA over a dense boolean mask instead of FlexAttention.
    "1gpu-sdpa": ["1", ["--train.flex_attention=false"]],
    "1gpu-compile-sdpa": ["1", ["--train.compile=true", "--train.flex_attention=false"]],
    # One GPU runs bf16 compute weights with fp32 masters by default (train.master_weights = "auto"); these are the
    # fp32 weights under autocast, for the curve and the speed side by side.
    "1gpu-fp32weights": ["1", ["--train.master_weights=false"]],
    "1gpu-compile-fp32weights": ["1", ["--train.compile=true", "--train.master_weights=false"]],
}


def launch(name: str, processes: str, extra: list[str], args: argparse.Namespace) -> dict:
    overrides = [f"--name={name}", f"--train.out_dir={args.out}", f"--train.steps={args.steps}", "--overwrite",
                 *extra, *args.overrides]
    if processes == "1":
        cmd = [sys.executable, "-m", "mot.cli", "train", args.recipe, *overrides]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", processes, "--multi_gpu",
               "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
               "-m", "mot.cli", "train", args.recipe, *overrides]
    env = {**os.environ, **SAFE_ENV, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log = Path(args.out) / name / "log.jsonl"
    (Path(args.out) / f"{name}.stderr.txt").write_text(proc.stderr[-20000:])
    if proc.returncode != 0:
        print(f"{name}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}")
        return {"name": name, "ok": False}
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    steady = [r["tokens_per_s"] for r in train if r["step"] > args.steps // 5] or [train[-1]["tokens_per_s"]]
    return {"name": name, "ok": True, "processes": int(processes), "wall_s": wall, "train": train, "eval": evals,
            "tokens_per_s": statistics.median(steady), "mfu": statistics.median(r.get("mfu", 0) for r in train)}


def smoke_recipe(folder: Path) -> str:
    """A recipe of the tests' tiny model and corpus (tests/runs.py), 2 sequences per micro-batch: 1 process
    accumulates 2 micro-batches, 2 processes take one each, so both see the same global batches."""
    sys.path.insert(0, str(ROOT))
    from tests.runs import make_shards, run_config, write_recipe

    cfg = run_config(make_shards(folder / "shards"), folder, micro_batch_size=2, eval_every=4, checkpoint_every=4)
    write_recipe(folder / "smoke.toml", cfg)
    return str(folder / "smoke.toml")


def compare(args: argparse.Namespace) -> int:
    """Launch the variants one after the other and print their table."""
    results = [launch(v, *VARIANTS[v], args) for v in args.variants]
    ok = [r for r in results if r["ok"]]
    if not ok:
        return 1
    base = ok[0]
    print(f"\n{'run':<18}{'GPUs':>5}{'tokens/s':>12}{'per GPU':>12}{'per-GPU ratio':>14}{'MFU':>8}"
          f"{'final train':>13}{'final eval':>12}{'max |dloss|':>13}{'mean |dloss|':>13}")
    base_curve = {r["step"]: r["loss"] for r in base["train"]}
    for r in ok:
        curve = {row["step"]: row["loss"] for row in r["train"]}
        diffs = [abs(curve[s] - base_curve[s]) for s in curve if s in base_curve]
        per_gpu = r["tokens_per_s"] / r["processes"]
        base_per_gpu = base["tokens_per_s"] / base["processes"]
        print(f"{r['name']:<18}{r['processes']:>5}{r['tokens_per_s']:>12.0f}{per_gpu:>12.0f}"
              f"{per_gpu / base_per_gpu:>14.3f}{100 * r['mfu']:>7.1f}%{r['train'][-1]['loss']:>13.4f}"
              f"{r['eval'][-1]['loss'] if r['eval'] else float('nan'):>12.4f}"
              f"{max(diffs):>13.4f}{statistics.mean(diffs):>13.4f}")
    print("\nloss every 30 steps (log windows of train.log_every steps):")
    steps = [s for s in sorted(base_curve) if s % 30 == 0]
    print("step  " + "".join(f"{r['name']:>18}" for r in ok))
    for s in steps:
        print(f"{s:<6}" + "".join(f"{next((x['loss'] for x in r['train'] if x['step'] == s), float('nan')):>18.4f}"
                                  for r in ok))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/demo_gpu.toml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="/tmp/mot_multi_gpu")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), help="default: all")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny model and corpus on the CPU, 4 steps")
    args, args.overrides = parser.parse_known_args()
    if not args.smoke:
        args.variants = args.variants or list(VARIANTS)
        return compare(args)
    with tempfile.TemporaryDirectory(prefix="mot-multi-gpu-") as folder:
        args.out, args.recipe, args.steps = folder, smoke_recipe(Path(folder)), 4
        args.variants = args.variants or ["1gpu", "2gpu-ddp"]
        return compare(args)


if __name__ == "__main__":
    sys.exit(main())
