"""Full training step, dense against MoT of the same recipe: the trainer's own step, on loader batches.

    python3 bench/step.py [--dim 2048 --layers 16 --heads 16 --seq-len 4096 --micro-batch 4]
                          [--tokens-per-update 65536 262144] [--steps 5 --warmup 2] [--variants dense mot]
                          [--vocab chameleon|demo] [--cuda-graph off on] [--profile] [--json OUT] [--smoke]

    # the scaling study's small models (issue 19): host-bound eager, against train.cuda_graph
    python3 bench/step.py --dim 640 --layers 8 --heads 10 --seq-len 1024 --vocab demo \
        --tokens-per-update 65536 --micro-batch 64 --cuda-graph off on --profile

Each variant is a `Trainer` (mot/train/trainer.py) of a ~1B recipe (d=2048, 16 layers, Chameleon's 65,536-id
vocabulary with 8,192 image codes and 500 speech units), with `mot train`'s GPU settings: bf16 with fp32 master
weights, blocks and loss compiled, FlexAttention document masks. What is timed is `Trainer.update()`, the
call `fit` makes for every step: each micro-batch drawn new from the trainer's `PackedLoader`, its towers
counted and its document mask built from its own documents, copied to the GPU, forward and backward; then
the clip, AdamW and the schedule. Wall clock from one CUDA sync to the next around each update: median of
--steps after --warmup, with min-max. Dense and MoT run one after the other in one process; the ratio is theirs.

The data: a corpus of random ids in the prepared layout (mot/data/random_corpus.py: documents of seq_len/4 to
seq_len tokens, 20 / 62 / 18 % text / image / speech tokens, images of 1,024 codes), large enough that no
document repeats within the timed steps. FLOPs are the trainer's own count for each step: projections per
token, plus attention under each micro-batch's document mask (mot/flops.py attention_pairs); MFU against the
card's dense bf16 peak, the full-row causal figure beside it, labelled. On the CPU (--smoke) a tiny model runs
in fp32, eager, with boolean masks: it checks the script, not the numbers.

The replayed micro-benchmark that this replaced (one fixed micro-batch for every micro-batch, FSDP variants)
is bench/step_replay.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
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
from mot.flops import dense_baseline, size_report  # noqa: E402
from mot.train.trainer import Trainer  # noqa: E402
from mot.vocab import UnifiedVocab  # noqa: E402


def recipe(args) -> ModelConfig:
    if args.smoke:
        mods = [ModalityConfig("text", 96, token_fraction=0.2), ModalityConfig("image", 64, token_fraction=0.62),
                ModalityConfig("speech", 32, token_fraction=0.18)]
        return ModelConfig(dim=64, n_layers=2, n_heads=4, modalities=mods, max_seq_len=args.seq_len)
    if args.vocab == "demo":  # the demo tokenizers' sizes, as the scaling study's models use them
        mods = [ModalityConfig("text", 512, token_fraction=0.3), ModalityConfig("image", 512, token_fraction=0.5),
                ModalityConfig("speech", 128, token_fraction=0.2)]
        return ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, modalities=mods,
                           max_seq_len=args.seq_len)
    # Chameleon's vocabulary: 65,536 ids with 8,192 image codes; 500 speech units.
    mods = [ModalityConfig("text", 65536 - 8192 - 500 - 64, token_fraction=0.2),
            ModalityConfig("image", 8192, token_fraction=0.62), ModalityConfig("speech", 500, token_fraction=0.18)]
    return ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, modalities=mods,
                       max_seq_len=args.seq_len)


def run_config(model: ModelConfig, name: str, tokens_per_update: int, args, shards: Path, out_dir: Path,
               cuda: bool) -> RunConfig:
    """`mot train`'s settings for this size; validated as a recipe is."""
    train = TrainConfig(seq_len=args.seq_len, batch_size=tokens_per_update // args.seq_len,
                        micro_batch_size=args.micro_batch, steps=args.warmup + args.steps, warmup_steps=1,
                        compile=cuda, cuda_graph=args.cuda_graph == ["on"], log_every=1, eval_every=0,
                        checkpoint_every=0, tensorboard=False,
                        out_dir=str(out_dir))
    cfg = RunConfig(name=name, model=model, train=train, data=DataConfig(shards=str(shards), eval_fraction=0.0))
    return config_from_dict(config_to_dict(cfg), where=f"bench/step.py {name}")


def time_updates(trainer: Trainer, args, device: torch.device) -> dict:
    """--warmup then --steps calls of trainer.update(), each timed between CUDA syncs."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(args.warmup):
        trainer.update()
    sync()
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, flops, losses = [], [], []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        update = trainer.update()
        sync()
        seconds.append(time.perf_counter() - start)
        flops.append(trainer.state.step_flops)
        losses.append(update.weighted)
    return {"seconds": seconds, "flops": flops, "losses": losses, "warmup_s": warmup_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
            "master_weights": trainer.state.master_weights}


def profile_updates(trainer: Trainer, device: torch.device, updates: int = 2) -> dict:
    """Host and GPU time of `updates` calls of trainer.update() under torch.profiler; prints the top ops."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(updates):
            trainer.update()
        sync()
    wall_ms = 1e3 * (time.perf_counter() - start) / updates
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in kernels) / 1e3 / updates  # kernel time; overlap counted twice
    launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                   "cuLaunchKernelEx"))
    syncs = sum(1 for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                "cudaEventSynchronize"))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    if kernels:
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
    out = {"wall_ms": wall_ms, "gpu_kernel_ms": gpu_ms, "launches_per_update": launches / updates,
           "syncs_per_update": syncs / updates}
    print(f"profile: {wall_ms:.1f} ms per update (profiler on), GPU kernels {gpu_ms:.1f} ms, "
          f"{launches / updates:.0f} kernel launches and {syncs / updates:.0f} host syncs per update", flush=True)
    return out


def summarise(name: str, tokens: int, timed: dict, full_causal_per_token: float, peak: float | None) -> dict:
    ms = [1e3 * s for s in timed["seconds"]]
    median_ms = statistics.median(ms)
    # The FLOPs of the median step itself would pair one step's mask with another's time: use the mean.
    flops = statistics.mean(timed["flops"])
    row = {"name": name, "tokens_per_update": tokens, "ms": median_ms, "min_ms": min(ms), "max_ms": max(ms),
           "tokens_per_s": tokens / (median_ms / 1e3), "tflops": flops / (median_ms / 1e3) / 1e12,
           "tflops_full_causal": full_causal_per_token * tokens / (median_ms / 1e3) / 1e12,
           **{k: v for k, v in timed.items() if k not in ("seconds",)}, "ms_all": ms}
    if peak:
        row["mfu"], row["mfu_full_causal"] = row["tflops"] * 1e12 / peak, row["tflops_full_causal"] * 1e12 / peak
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per forward pass")
    parser.add_argument("--tokens-per-update", type=int, nargs="+", default=[65536, 262144])
    parser.add_argument("--steps", type=int, default=5, help="timed updates per variant")
    parser.add_argument("--warmup", type=int, default=2, help="updates before timing (compilation included)")
    parser.add_argument("--variants", nargs="+", default=["dense", "mot"], choices=["dense", "mot"])
    parser.add_argument("--vocab", default="chameleon", choices=["chameleon", "demo"],
                        help="chameleon: 65,536 ids (8,192 image codes, 500 speech units); demo: the demo "
                             "tokenizers' 512 / 512 / 128")
    parser.add_argument("--cuda-graph", nargs="+", default=["off"], choices=["off", "on"],
                        help="train.cuda_graph: each micro-batch's forward and backward as one CUDA graph")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile 2 updates: host and GPU time, kernel launches, top ops")
    parser.add_argument("--json", default="")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script")
    parser.add_argument("--corpus", default="", help=argparse.SUPPRESS)  # set for the child processes
    args = parser.parse_args()
    if args.smoke and not args.corpus:
        args.seq_len, args.micro_batch, args.tokens_per_update, args.steps, args.warmup = 128, 2, [512], 2, 1
    for tokens in args.tokens_per_update:
        if tokens % (args.seq_len * args.micro_batch):
            parser.error(f"--tokens-per-update {tokens} is not a multiple of seq_len x micro-batch "
                         f"({args.seq_len} x {args.micro_batch})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("the trainer's GPU step needs a CUDA GPU; --smoke runs the script on the CPU")

    mot_cfg = recipe(args)
    configs = {"dense": dense_baseline(mot_cfg), "mot": mot_cfg}
    peak = None
    if device.type == "cuda":
        from mot.train.state import peak_flops

        peak = peak_flops(device, 0.0)
        if not args.corpus:
            print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; MFU against "
                  f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else torch.cuda.get_device_name(), flush=True)
    if args.corpus:  # a child: one variant at one batch size, its row to --json
        (variant,), (tokens,), (graph,) = args.variants, args.tokens_per_update, args.cuda_graph
        row = run_one(configs[variant], variant, tokens, args, Path(args.corpus), device, peak)
        Path(args.json).write_text(json.dumps(row))
        return 0
    for label, cfg in configs.items():
        report = size_report(cfg, args.seq_len)
        print(f"{label}: {report.total_params / 1e9:.3f}B params, "
              f"{report.flops_forward_backward_mixed / 1e9:.2f} GFLOP/token fwd+bwd (full-row causal)", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="mot-bench-step-") as folder:
        folder = Path(folder)
        # Every token the largest run reads, 10% more: no document repeats while timing.
        needed = int(1.1 * max(args.tokens_per_update) * (args.warmup + args.steps))
        start = time.perf_counter()
        manifest = write_random_corpus(folder / "corpus", UnifiedVocab(mot_cfg), needed,
                                       (args.seq_len // 4, args.seq_len))
        print(f"corpus: {manifest['documents']} documents, {manifest['tokens']:,} random ids in "
              f"{time.perf_counter() - start:.1f} s; token shares {manifest['options']['random']['tokens']}",
              flush=True)
        for tokens in args.tokens_per_update:
            for graph in args.cuda_graph:
                for variant in args.variants:
                    results.append(run_child(variant, tokens, graph, folder, args))
    print_table(results, args, peak)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


def run_child(variant: str, tokens: int, graph: str, folder: Path, args) -> dict:
    """One variant at one batch size in a process of its own: torch.compile starts from nothing (no shapes of the
    other variant to turn into dynamic ones), and the memory peak is that variant's."""
    row_file = folder / f"{variant}_{tokens}_{graph}.json"
    command = [sys.executable, __file__, "--corpus", str(folder / "corpus"), "--json", str(row_file),
               "--variants", variant, "--tokens-per-update", str(tokens), "--dim", str(args.dim),
               "--layers", str(args.layers), "--heads", str(args.heads), "--seq-len", str(args.seq_len),
               "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--vocab", args.vocab, "--cuda-graph", graph]
    command += (["--smoke"] if args.smoke else []) + (["--profile"] if args.profile else [])
    subprocess.run(command, check=True)
    return json.loads(row_file.read_text())


def run_one(cfg: ModelConfig, variant: str, tokens: int, args, corpus: Path, device: torch.device,
            peak: float | None) -> dict:
    cfg = run_config(cfg, variant, tokens, args, corpus, corpus.parent / "runs", device.type == "cuda")
    start = time.perf_counter()
    trainer = Trainer(cfg, where=f"bench/step.py {variant}", overwrite=True, progress=False)
    setup_s = time.perf_counter() - start
    timed = time_updates(trainer, args, device)
    row = summarise(variant, tokens, timed, size_report(cfg.model, args.seq_len).flops_forward_backward_mixed, peak)
    t = cfg.train
    flex = device.type == "cuda" and (t.flex_attention is True or (t.flex_attention == "auto" and t.compile))
    row.update(setup_s=setup_s, compile=t.compile, flex_attention=flex, cuda_graph=t.cuda_graph)
    if args.profile:
        row["profile"] = profile_updates(trainer, device)
    print(f"{variant}{' (CUDA graph)' if t.cuda_graph else ''} at {tokens:,} tokens per update: {row['ms']:.1f} ms "
          f"({row['min_ms']:.1f}-{row['max_ms']:.1f}), "
          f"set-up {setup_s:.0f} s, warm-up {timed['warmup_s']:.0f} s, master weights {trainer.state.master_weights}",
          flush=True)
    return row


def print_table(results: list[dict], args, peak: float | None) -> None:
    print(f"\n{'tokens/update':>13} {'variant':<7}{'graph':>6}{'ms/step':>10}{'min-max':>17}{'tokens/s':>10}"
          f"{'TFLOP/s':>9}{'MFU':>7}{'MFU full':>9}{'GiB':>6}{'x dense':>8}")
    for r in results:
        dense = next((d for d in results if d["name"] == "dense" and d["tokens_per_update"] == r["tokens_per_update"]
                      and d.get("cuda_graph") == r.get("cuda_graph")), None)
        ratio = r["ms"] / dense["ms"] if dense else float("nan")
        mfu = f"{100 * r['mfu']:.1f}%" if peak else "-"
        mfu_full = f"{100 * r['mfu_full_causal']:.1f}%" if peak else "-"
        graph = "on" if r.get("cuda_graph") else "off"
        print(f"{r['tokens_per_update']:>13,} {r['name']:<7}{graph:>6}{r['ms']:>10.1f}"
              f"{r['min_ms']:>8.1f}-{r['max_ms']:<8.1f}"
              f"{r['tokens_per_s']:>10.0f}{r['tflops']:>9.1f}{mfu:>7}{mfu_full:>9}{r['peak_gib']:>6.1f}{ratio:>8.3f}")
    print(f"\nms/step: median of {args.steps} updates after {args.warmup} (min-max beside it), wall clock between "
          "CUDA syncs around Trainer.update(), loader included. TFLOP/s and MFU: the trainer's FLOPs of each step "
          "(attention under the micro-batches' document masks); 'MFU full': attention as full-row causal.")


if __name__ == "__main__":
    sys.exit(main())
