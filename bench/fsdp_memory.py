"""Memory per GPU of a large MoT under FSDP2, estimated from `mot flops`'s parameter counts and the peak measured
for a ~1B upcycled Chameleon-shape model on one GPU (bench/chameleon_pipeline.py's JSON).

    python3 bench/fsdp_memory.py [--recipe recipes/paper/chameleon_7b.toml]
                                 [--measured bench/results/chameleon_pipeline_h200_2026-12-03.json] [--gpus 2 4 8]

An estimate, not a measurement; its parts:

    state        the trainer's FSDP2 policy keeps fp32 parameters, fp32 gradients and AdamW's two fp32 moments,
                 all sharded: 16 bytes x parameters / GPUs
    gathered     bf16 weights of two blocks unsharded at once (the one computing, the one prefetched), and one
                 block's fp32 gradient before its reduce-scatter
    activations  what the measured 1B peak holds beyond its own state (its bf16 weights, fp32 masters, two
                 moments and fp32 gradient sums: 18 bytes per parameter under master weights), per sequence of
                 its micro-batch, scaled by hidden size x layers; `--checkpointed`: block inputs kept (2 bytes x
                 hidden x layers per token) plus one block's share of the measured activations

The 1B figure includes the logits and the allocator's slack, which this scales with the blocks (an
over-estimate for the larger model, whose logits grow with its hidden size only through the head's input).
A tower frozen with `train.freeze` saves nothing here: its slices stay in trainable parameters (zero moments).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mot.config import ModalityConfig, ModelConfig, load_config  # noqa: E402
from mot.flops import size_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
MASTER_WEIGHT_BYTES = 2 + 4 + 4 + 4 + 4  # bf16 weight, fp32 master, two moments, fp32 gradient sum
FSDP_STATE_BYTES = 4 + 4 + 4 + 4  # fp32 sharded parameter, gradient and two moments


def measured_model(settings: dict, codes: int) -> ModelConfig:
    """The upcycled model bench/chameleon_pipeline.py trained (text and image towers)."""
    mods = [ModalityConfig("text", settings["vocab"] - codes), ModalityConfig("image", codes)]
    return ModelConfig(dim=settings["hidden"], n_layers=settings["layers"], n_heads=settings["heads"],
                       n_kv_heads=settings["kv_heads"], ffn_dim=settings["ffn"], modalities=mods,
                       max_seq_len=settings["max_positions"])


def block_params(cfg: ModelConfig) -> float:
    report = size_report(cfg, cfg.max_seq_len)
    return (report.total_params - report.embedding_params) / cfg.n_layers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/paper/chameleon_7b.toml"))
    parser.add_argument("--measured", default=str(ROOT / "bench/results/chameleon_pipeline_h200_2026-12-03.json"))
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward pass")
    parser.add_argument("--smoke", action="store_true", help="the same (arithmetic only, a second): for CI")
    args = parser.parse_args()

    run = json.loads(Path(args.measured).read_text())
    settings = run["settings"]
    peak_gib = next(s["peak_gib"] for s in run["steps"] if s["step"].startswith("train"))
    small = measured_model(settings, run["release"]["image_codes"])
    small_params = size_report(small, small.max_seq_len).total_params
    small_state = MASTER_WEIGHT_BYTES * small_params / GIB
    per_sequence = (peak_gib - small_state) / settings["micro"]

    target = load_config(args.recipe)
    big, seq_len = target.model, target.train.seq_len
    report = size_report(big, seq_len)
    scale = (big.dim * big.n_layers) / (small.dim * small.n_layers) * seq_len / settings["seq_len"]
    activations = per_sequence * scale * args.micro_batch
    checkpointed = (2 * big.dim * big.n_layers * seq_len / GIB + per_sequence * scale / big.n_layers) * args.micro_batch
    gathered = (2 * 2 + 4) * block_params(big) / GIB

    print(f"measured: {run['device']}, {small_params / 1e9:.2f}B parameters (upcycled, master weights), micro-batch "
          f"{settings['micro']} x {settings['seq_len']}: peak {peak_gib:.1f} GiB = state {small_state:.1f} GiB + "
          f"{per_sequence:.1f} GiB per sequence of activations, logits and slack")
    print(f"estimated: {target.name}, {report.total_params / 1e9:.2f}B parameters, FSDP2, micro-batch "
          f"{args.micro_batch} x {seq_len} per GPU, activations x {scale:.1f} of the measured per sequence\n")
    print("| GPUs | sharded state | gathered blocks | activations | per GPU | with activation checkpointing |")
    print("|---|---|---|---|---|---|")
    for n in args.gpus:
        state = FSDP_STATE_BYTES * report.total_params / n / GIB
        print(f"| {n} | {state:.1f} GiB | {gathered:.1f} GiB | {activations:.1f} GiB | "
              f"{state + gathered + activations:.1f} GiB | {state + gathered + checkpointed:.1f} GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
