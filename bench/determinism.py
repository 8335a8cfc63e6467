"""Do two runs of the same training steps give the same bits? Dense against MoT, the trainer's own step.

    python3 bench/determinism.py [--dim 320 --layers 8 --heads 5] [--steps 40] [--repeats 2]
                                 [--variants dense mot] [--modes default inductor torch] [--json OUT] [--smoke]

Why: in the scaling study (docs/results/scaling/README.md) the MoT runs repeated an earlier session's training
losses exactly, on a fresh machine, while the dense runs parted from them after 60-80 steps. Each repeat here is
a process of its own with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR), as on a fresh machine, so
whatever inductor picks by timing kernels on the device is picked again. Modes:

- default: `mot train`'s settings (the scaling recipes': bf16, compiled blocks, train.cuda_graph);
- inductor: TORCHINDUCTOR_DETERMINISTIC=1, inductor's mode without on-device benchmarking where it changes
  numerics;
- torch: torch.use_deterministic_algorithms(True, warn_only=True) with CUBLAS_WORKSPACE_CONFIG set; the
  warnings it prints name each op without a deterministic kernel, and are listed per run.

Each repeat trains --steps updates of the same seed on the same batches (a corpus of random ids in the prepared
layout, mot/data/random_corpus.py) and saves its weights. Reported per variant and mode: whether every
repeat's per-step losses equal the first repeat's bit for bit, the first step where they part, the largest loss
and weight differences, and the median step time (so the price of a deterministic mode is beside it). On the CPU
(--smoke) a tiny model runs eager in fp32: it checks the script, where every mode is deterministic.
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
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mot.config import (  # noqa: E402
    DataConfig,
    ModalityConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
)
from mot.data.random_corpus import write_random_corpus  # noqa: E402
from mot.flops import dense_baseline  # noqa: E402
from mot.train.trainer import Trainer  # noqa: E402
from mot.vocab import UnifiedVocab  # noqa: E402

MODES = {  # environment of a repeat's process, by mode
    "default": {},
    "inductor": {"TORCHINDUCTOR_DETERMINISTIC": "1"},
    "torch": {"MOT_BENCH_TORCH_DETERMINISTIC": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
}


def model_config(args) -> ModelConfig:
    """The scaling study's two modalities at the demo tokenizers' sizes (recipes/scaling/scenes_10m.toml)."""
    mods = [ModalityConfig("text", 512, token_fraction=0.5), ModalityConfig("image", 512, token_fraction=0.5)]
    if args.smoke:
        return ModelConfig(dim=64, n_layers=2, n_heads=4, modalities=mods, max_seq_len=args.seq_len,
                           untie=["attn", "ffn", "norm"])
    return ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, modalities=mods,
                       max_seq_len=args.seq_len, untie=["attn", "ffn", "norm"])


def run_config(model: ModelConfig, name: str, args, corpus: Path, cuda: bool) -> RunConfig:
    train = TrainConfig(seq_len=args.seq_len, batch_size=args.batch, micro_batch_size=args.batch,
                        steps=args.steps, warmup_steps=1, lr=2e-3, compile=cuda, cuda_graph=cuda,
                        log_every=1, eval_every=0, checkpoint_every=0, tensorboard=False, seed=0,
                        out_dir=str(corpus.parent / "runs" / name))
    cfg = RunConfig(name=name, model=model, train=train, data=DataConfig(shards=str(corpus), eval_fraction=0.0))
    return config_from_dict(config_to_dict(cfg), where=f"bench/determinism.py {name}")


def repeat(args, variant: str, corpus: Path, out: Path) -> None:
    """One repeat, in its own process: --steps updates; losses, step times, warnings to out.json, the weights
    to out.pt."""
    from safetensors.torch import save_file

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if os.environ.get("MOT_BENCH_TORCH_DETERMINISTIC") == "1":
        torch.use_deterministic_algorithms(True, warn_only=True)
    mot_cfg = model_config(args)
    cfg = run_config(dense_baseline(mot_cfg) if variant == "dense" else mot_cfg, variant, args, corpus,
                     device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(cfg, where=f"bench/determinism.py {variant}", overwrite=True, progress=False)
        losses, seconds = [], []
        for _ in range(args.steps):
            sync()
            start = time.perf_counter()
            losses.append(float(trainer.update().weighted))
            sync()
            seconds.append(time.perf_counter() - start)
    model = trainer.state.accelerator.unwrap_model(trainer.state.model)
    weights = {name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters()}
    save_file(weights, str(out.with_suffix(".safetensors")))
    nondeterministic = sorted({str(w.message).split("\n")[0][:160] for w in caught
                               if "deterministic" in str(w.message)})
    out.with_suffix(".json").write_text(json.dumps({"losses": losses, "seconds": seconds,
                                                    "warnings": nondeterministic}))


def run_repeat(args, variant: str, mode: str, index: int, folder: Path) -> dict:
    """A repeat in a fresh process with an empty inductor cache; its record and weights."""
    from safetensors.torch import load_file

    out = folder / f"{variant}_{mode}_{index}"
    env = {**os.environ, **MODES[mode], "TORCHINDUCTOR_CACHE_DIR": str(folder / f"inductor_{variant}_{mode}_{index}")}
    command = [sys.executable, __file__, "--child", variant, "--corpus", str(folder / "corpus"),
               "--out", str(out), "--steps", str(args.steps), "--dim", str(args.dim), "--layers", str(args.layers),
               "--heads", str(args.heads), "--seq-len", str(args.seq_len), "--batch", str(args.batch)]
    subprocess.run(command + (["--smoke"] if args.smoke else []), check=True, env=env)
    record = json.loads(out.with_suffix(".json").read_text())
    record["weights"] = load_file(str(out.with_suffix(".safetensors")))
    return record


def compare_repeats(records: list[dict]) -> dict:
    """Every repeat against the first: bitwise equality of the losses, the first step they part (1-based), the
    largest loss and weight differences."""
    first = records[0]
    parted, loss_diff, weight_diff = [], 0.0, 0.0
    for other in records[1:]:
        steps = [i + 1 for i, (a, b) in enumerate(zip(first["losses"], other["losses"], strict=True)) if a != b]
        parted.append(steps[0] if steps else None)
        loss_diff = max(loss_diff, *(abs(a - b) for a, b in zip(first["losses"], other["losses"], strict=True)))
        weight_diff = max(weight_diff, *(float((first["weights"][n] - w).abs().max())
                                         for n, w in other["weights"].items()))
    median_ms = statistics.median(1e3 * s for r in records for s in r["seconds"][len(r["seconds"]) // 4:])
    return {"identical": all(p is None for p in parted), "first_parting_step": parted,
            "max_loss_difference": loss_diff, "max_weight_difference": weight_diff, "median_step_ms": median_ms,
            "warnings": sorted({w for r in records for w in r["warnings"]})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=320)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64, help="sequences per update (one micro-batch)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["dense", "mot"], choices=["dense", "mot"])
    parser.add_argument("--modes", nargs="+", default=["default", "inductor"], choices=sorted(MODES))
    parser.add_argument("--json", default="")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke and not args.child:
        args.seq_len, args.batch, args.steps, args.modes = 64, 2, 3, ["default"]
    if args.child:
        repeat(args, args.child, Path(args.corpus), Path(args.out))
        return 0
    if not torch.cuda.is_available() and not args.smoke:
        parser.error("the question is about CUDA kernels: run on a GPU, or --smoke on the CPU")
    if args.repeats < 2:
        parser.error("--repeats must be at least 2: each repeat is compared with the first")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mot-bench-determinism-") as folder:
        folder = Path(folder)
        tokens = int(1.1 * args.steps * args.batch * args.seq_len)
        write_random_corpus(folder / "corpus", UnifiedVocab(model_config(args)), tokens,
                            (args.seq_len // 4, args.seq_len), fractions={"text": 0.5, "image": 0.5})
        for variant in args.variants:
            for mode in args.modes:
                records = [run_repeat(args, variant, mode, i, folder) for i in range(args.repeats)]
                row = {"variant": variant, "mode": mode, **compare_repeats(records)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'variant':<8}{'mode':<10}{'identical':>10}{'parts at step':>15}{'max |d loss|':>14}"
          f"{'max |d weight|':>16}{'ms/step':>9}")
    for r in rows:
        parted = ",".join("-" if p is None else str(p) for p in r["first_parting_step"])
        print(f"{r['variant']:<8}{r['mode']:<10}{str(r['identical']):>10}{parted:>15}"
              f"{r['max_loss_difference']:>14.3g}{r['max_weight_difference']:>16.3g}{r['median_step_ms']:>9.1f}")
        for w in r["warnings"]:
            print(f"    nondeterministic op: {w}")
    print(f"\n{args.repeats} repeats of {args.steps} updates per variant and mode, each in a fresh process with an "
          "empty inductor cache, compared with the first; ms/step: median past each repeat's first quarter.")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
