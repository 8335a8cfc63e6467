"""A training step replayed on one fixed micro-batch, dense against MoT: kernel-level experiments, FSDP variants.

    python3 bench/step_replay.py [--dim 2048 --layers 16 --heads 16 --seq-len 4096 --micro-batch 2 --steps 15]
                          [--variants dense mot] [--modes eager compiled] [--json OUT] [--smoke]

Not the trainer's step (bench/step.py times that, on loader batches): here one synthetic micro-batch and its
mask, built once outside the timed loop, are replayed for every micro-batch, with no loader and no host-to-device
copy; for comparing kernels, optimizers and FSDP settings against each other, not for the README's figures.
What one step is here is what the trainer does (mot/train/trainer.py): embedding, blocks, head over the
unified vocabulary (Chameleon's 65,536), next-token loss per modality with a document mask, backward
under bf16 autocast with fp32 weights, gradient clipping, AdamW (the trainer's parameter groups). The data
is the 3-modality layout of DESIGN.md's routing table (1656 text / 5120 image / 1416 speech tokens in
2 x 4096), in documents of seq_len/4 to seq_len tokens. "compiled" compiles each block as `train.compile` does.

Prints ms per step (median of --steps after warm-up, with min-max), tokens/s, TFLOP/s and MFU against the
card's dense bf16 peak (stated; attention counted under the batch's document mask, as the trainer counts
it, the full-row causal TFLOP/s in the JSON beside it), peak memory, the MoT/dense ratio, and recompiles
across 3 new layouts. On the CPU (--smoke) the modes run eager with SDPA masks.

FSDP: launched by torchrun, every block and then the root are sharded with `fully_shard` (bf16 parameters, fp32
gradient reduction, the trainer's policy); each process runs its own micro-batch. With
`--baseline ONE_GPU.json` (this script's --json of a 1-GPU run on the same machine) it prints tokens/s per GPU
against the 1-GPU figure:

    python3 bench/step_replay.py --json one.json && torchrun --nproc-per-node 2 bench/step_replay.py --baseline one.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step import recipe  # noqa: E402  (bench/step.py: the same ~1B recipe)

from mot.config import ModelConfig, TrainConfig  # noqa: E402
from mot.data.loader import count_towers, document_causal_mask  # noqa: E402
from mot.data.synthetic import bench_layout, random_layout, tokens_for_layout  # noqa: E402
from mot.flops import (  # noqa: E402
    attention_flops,
    attention_pairs,
    dense_baseline,
    projection_flops_per_token,
    size_report,
)
from mot.model import ModelInputs, MoTTransformer  # noqa: E402
from mot.model.masks import document_block_mask  # noqa: E402
from mot.objectives.ar import next_token_loss  # noqa: E402
from mot.train.optim import build_optimizer, clip_gradients  # noqa: E402
from mot.train.sharding import keep_gathered  # noqa: E402
from mot.train.state import peak_flops  # noqa: E402


def make_batch(model: MoTTransformer, layout: torch.Tensor, device, seed: int, doc_len: tuple[int, int]):
    gen = torch.Generator().manual_seed(seed)
    tokens = tokens_for_layout(layout, model.vocab, gen)
    batch, seq_len = layout.shape
    # Packed documents: random lengths, positions restart at each, attention stays inside each.
    doc_ids = torch.empty_like(layout)
    positions = torch.empty_like(layout)
    for b in range(batch):
        start, doc = 0, 0
        while start < seq_len:
            n = int(torch.randint(doc_len[0], doc_len[1] + 1, (1,), generator=gen))
            doc_ids[b, start : start + n] = doc
            positions[b, start : start + n] = torch.arange(min(n, seq_len - start))
            start, doc = start + n, doc + 1
    # Tokens per tower counted on the host, as the trainer does (PackedBatch.counted): no sync in the forward.
    counts = count_towers(layout, len(model.cfg.modalities))
    return [t.to(device) for t in (tokens, layout, positions, doc_ids)] + [counts]


def shard(model: MoTTransformer, prefetch: bool) -> None:
    """FSDP2 as the trainer sets it up: each block a unit, then the root; bf16 compute, fp32 reduction.
    prefetch: each block's pre-forward (pre-backward) hook also issues the next (previous) block's all-gather."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if prefetch:
        blocks = list(model.blocks)
        for block, following in zip(blocks, blocks[1:], strict=False):
            block.set_modules_to_forward_prefetch([following])
            following.set_modules_to_backward_prefetch([block])


def check_master_update(device) -> None:
    """The compiled master-weight update (CUDA) against the same function run eagerly, on random tensors."""
    from mot.train import master_weights

    gen = torch.Generator(device=device).manual_seed(0)
    shapes = [(3, 256, 128), (1000,), (64, 96)]
    rand = lambda shape, scale=1.0: scale * torch.randn(shape, generator=gen, device=device)
    base = [[rand(s) for s in shapes], [rand(s).bfloat16() for s in shapes], [rand(s, 0.1) for s in shapes],
            [rand(s, 0.01).abs() for s in shapes], [rand(s).bfloat16() for s in shapes]]
    scalars = torch.tensor([0.999, 0.1, 0.95, 0.05, 1e-8, 0.01, 0.3], device=device)
    inv_scale = torch.tensor(0.7, device=device)
    eager = [[t.clone() for t in ts] for ts in base]
    compiled = [[t.clone() for t in ts] for ts in base]
    master_weights.adamw_update_many(*eager[:4], scalars, inv_scale, eager[4])
    master_weights._update_fn(device)(*compiled[:4], scalars, inv_scale, compiled[4])
    worst = 0.0
    for a, b in zip(sum(eager, []), sum(compiled, []), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        worst = max(worst, float((a.float() - b.float()).abs().max()))
    print(f"master-weight update: compiled = eager (max |diff| {worst:.2e})")


def check_tower_mm(device) -> None:
    """The per-tower GEMM op on the GPU (bf16, one tower without rows) against float64: forward, input
    gradient, and weight gradients added into fp32 sums over two backward passes (cuBLAS's in-place
    accumulation)."""
    from mot.model.tower_matmul import tower_mm

    gen = torch.Generator(device=device).manual_seed(0)
    counts = torch.tensor([1656, 0, 2440])
    rows, d_in, d_out = int(counts.sum()), 512, 384
    weight = torch.randn(3, d_out, d_in, generator=gen, device=device).bfloat16()
    grad_sum = torch.zeros(3, d_out, d_in, device=device)
    expected = torch.zeros(3, d_out, d_in, device=device, dtype=torch.float64)
    ends = counts.cumsum(0).tolist()
    bounds = list(zip([0] + ends[:-1], ends, strict=True))
    for _ in range(2):
        x = torch.randn(rows, d_in, generator=gen, device=device).bfloat16().requires_grad_()
        dy = torch.randn(rows, d_out, generator=gen, device=device).bfloat16()
        y = tower_mm(x, weight, counts, grad_sum)
        y.backward(dy)
        ref_y = torch.cat([x[a:b].double() @ weight[t].double().t() for t, (a, b) in enumerate(bounds)])
        ref_dx = torch.cat([dy[a:b].double() @ weight[t].double() for t, (a, b) in enumerate(bounds)])
        for t, (a, b) in enumerate(bounds):
            expected[t] += dy[a:b].double().t() @ x[a:b].detach().double()
        torch.testing.assert_close(y.double(), ref_y, rtol=1e-2, atol=1e-2 * float(ref_y.abs().max()))
        torch.testing.assert_close(x.grad.double(), ref_dx, rtol=1e-2, atol=1e-2 * float(ref_dx.abs().max()))
    error = float((grad_sum.double() - expected).abs().max() / expected.abs().max())
    assert error < 1e-5 and torch.count_nonzero(grad_sum[1]) == 0, error
    print(f"per-tower GEMM op: matches float64 (fp32 gradient sums: max relative error {error:.1e})")


def run_variant(name: str, cfg: ModelConfig, mode: str, args, device) -> dict:
    """mode: "<eager|compiled>-<mask|flex>-<foreach|fused|fusedclip|master>[-closs][-prefetch][-keep]": fusedclip folds
    the gradient clip into the fused AdamW kernel (mot.train.optim.clip_gradients); master: bf16 compute weights
    with fp32 masters in the optimizer (mot.train.master_weights, the clip folded in too); closs: the loss under
    torch.compile; prefetch (FSDP): explicit all-gather prefetching of the next block; keep (FSDP): gathered
    weights kept over the step's micro-batches (mot.train.sharding); grouped: MoT projections as one
    `torch._grouped_mm` each (the route's slice sizes stay on the device) instead of one cuBLAS GEMM per tower;
    stash (master, several micro-batches): the blocks' bf16 weight gradients are added into fp32 sums after each
    micro-batch instead of inside their backward GEMMs (MasterWeightAdamW.accumulate_in_backward, the
    trainer's default)."""
    compiled, attention, optim, *extra = mode.split("-")
    cfg = dataclasses.replace(cfg, kernels="grouped" if "grouped" in extra else "auto")
    loss_fn = torch.compile(next_token_loss) if "closs" in extra else next_token_loss
    torch.manual_seed(0)
    model = MoTTransformer(cfg).to(device)
    if compiled == "compiled":
        for block in model.blocks:
            block.compile()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world > 1:
        shard(model, prefetch="prefetch" in extra)
    if optim == "master" and world > 1:
        raise SystemExit("master weights run on one process (FSDP's bf16 policy casts per shard)")
    optimizer = build_optimizer(model, TrainConfig(steps=10, warmup_steps=0), fused=optim != "foreach",
                                master_weights=optim == "master")
    if optim == "master" and args.accum_steps > 1 and "stash" not in extra:
        optimizer.accumulate_in_backward(model)
    layout = bench_layout(args.seq_len)
    layout = layout.repeat(max(1, args.micro_batch // layout.shape[0]), 1)[: args.micro_batch]
    doc_len = (args.seq_len // 4, args.seq_len)
    n_mod = cfg.n_modalities
    # bf16 autocast on the GPU; on the CPU (--smoke) only where the weights are bf16 already
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or optim == "master")

    pairs_of_batch = []  # the (query, key) pairs each batch's document mask allows, for the FLOPs

    def batch_for(layout, seed):
        tokens, modality, positions, doc_ids, counts = make_batch(model, layout, device, seed, doc_len)
        mask = document_block_mask(doc_ids) if attention == "flex" else document_causal_mask(doc_ids)
        pairs_of_batch.append(attention_pairs(doc_ids.cpu()))
        return tokens, modality, positions, mask, counts

    def forward_backward_once(tokens, modality, positions, mask, counts):
        with autocast:
            logits = model(ModelInputs(tokens, modality, positions, mask, tower_counts=counts)).logits
        loss, _, _ = loss_fn(logits, tokens, modality, n_mod)
        loss.backward()

    def forward_backward(*batch):
        """--accum-steps micro-batches; under FSDP gradients are reduced on the last only (as the trainer's
        accelerate no_sync does)."""
        for k in range(args.accum_steps):
            if world > 1:
                model.set_requires_gradient_sync(k == args.accum_steps - 1)
                if "keep" in extra:
                    keep_gathered(model, k, args.accum_steps)
            forward_backward_once(*batch)
            if optim == "master" and k < args.accum_steps - 1:
                optimizer.stash_gradients()

    def update():
        if optim in ("fusedclip", "master"):
            clip_gradients(optimizer, model.parameters(), 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rank = torch.distributed.get_rank() if world > 1 else 0
    batch = batch_for(layout, 1000 * rank)  # each process its own documents
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(args.warmup):
        forward_backward(*batch)
        update()
    sync()
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fb_ms, opt_ms = [], []
    for _ in range(args.steps):
        if device.type == "cuda":
            events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            events[0].record()
            forward_backward(*batch)
            events[1].record()
            update()
            events[2].record()
            events[2].synchronize()
            fb_ms.append(events[0].elapsed_time(events[1]))
            opt_ms.append(events[1].elapsed_time(events[2]))
        else:
            t0 = time.perf_counter()
            forward_backward(*batch)
            t1 = time.perf_counter()
            update()
            fb_ms.append(1e3 * (t1 - t0))
            opt_ms.append(1e3 * (time.perf_counter() - t1))
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    if args.profile and device.type == "cuda" and rank == 0:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                forward_backward(*batch)
                update()
            sync()
        print(f"\n--- {name} {mode}: top CUDA kernels over 3 steps ---")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile, max_name_column_width=70))
        if args.json:  # every kernel, for sums by kind: name, calls, total ms over the 3 steps
            rows = [(e.key, e.count, e.device_time_total / 1e3) for e in prof.key_averages() if e.device_time_total > 0]
            kernels = Path(args.json).with_name(f"{Path(args.json).stem}_{name}_{mode}_kernels.tsv")
            kernels.write_text("".join(f"{k}\t{c}\t{ms:.3f}\n" for k, c, ms in rows))

    recompiles = None
    if compiled == "compiled":
        counters = torch._dynamo.utils.counters
        before = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
        gen = torch.Generator().manual_seed(1)
        for seed in range(3):  # new modality counts and document boundaries
            forward_backward_once(*batch_for(random_layout(args.micro_batch, args.seq_len, list(range(n_mod)), 512,
                                                           gen), seed + 1 + 1000 * rank))
            update()
        sync()
        recompiles = (sum(counters["recompiles"].values()) if "recompiles" in counters else 0) - before

    tokens = args.accum_steps * args.micro_batch * args.seq_len
    # Attention under the timed batch's document mask (the one replayed for every micro-batch), as the trainer
    # counts it; the full-row causal count beside it, labelled.
    flops = (tokens * projection_flops_per_token(cfg)
             + 3 * attention_flops(cfg, pairs_of_batch[0] * args.accum_steps))
    full_causal = size_report(cfg, args.seq_len, attention="causal").flops_forward_backward_mixed * tokens
    total = [a + b for a, b in zip(fb_ms, opt_ms, strict=True)]
    ms = statistics.median(total)
    return {"name": name, "mode": mode, "ms": ms, "min_ms": min(total), "max_ms": max(total),
            "fwd_bwd_ms": statistics.median(fb_ms), "optimizer_ms": statistics.median(opt_ms),
            "tokens_per_s": tokens / (ms / 1e3), "tflops": flops / (ms / 1e3) / 1e12,
            "fwd_bwd_tflops": flops / (statistics.median(fb_ms) / 1e3) / 1e12, "peak_gib": peak_mem,
            "tflops_full_causal": full_causal / (ms / 1e3) / 1e12,
            "warmup_s": warmup_s, "recompiles": recompiles, "world_size": world}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["dense", "mot"], choices=["dense", "mot"])
    parser.add_argument("--modes", nargs="+", default=["compiled-flex-fused-closs", "compiled-flex-fusedclip-closs"],
                        help="<eager|compiled>-<mask|flex>-<foreach|fused|fusedclip|master>[-closs]: compile the "
                             "blocks or not; dense boolean document mask through SDPA or a FlexAttention BlockMask; "
                             "AdamW multi-tensor, fused, fused with the clip folded in, or over bf16 compute weights "
                             "with fp32 masters; the loss compiled too")
    parser.add_argument("--accum-steps", type=int, default=1,
                        help="micro-batches per optimizer step, measured (one step = all of them and the update)")
    parser.add_argument("--accum", type=int, default=8,
                        help="also report the ratio per optimizer step of this many micro-batches (derived from the "
                             "measured fwd+bwd per micro-batch and optimizer times)")
    parser.add_argument("--profile", type=int, default=0, help="print this many top CUDA kernels per variant")
    parser.add_argument("--json", default="")
    parser.add_argument("--baseline", default="", help="--json of a 1-GPU run: print tokens/s per GPU against it")
    parser.add_argument("--smoke", action="store_true", help="tiny model, runs on the CPU in seconds")
    args = parser.parse_args()
    if args.smoke:
        args.seq_len, args.steps, args.warmup = 256, 2, 1

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # FlexAttention has no CPU backward, and compiling the blocks there only costs time
        args.modes = [m.replace("compiled-", "eager-").replace("-flex-", "-sdpa-") for m in args.modes]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # torchrun: FSDP over the processes
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    main_process = int(os.environ.get("RANK", "0")) == 0
    say = print if main_process else (lambda *a, **k: None)
    mot_cfg = recipe(args)
    configs = {"dense": dense_baseline(mot_cfg), "mot": mot_cfg}
    peak = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = peak_flops(device, 0.0)
        say(f"{world} x {name}, torch {torch.__version__}; MFU against {peak / 1e12:.0f} TFLOP/s dense bf16" if peak
            else name)
    for label, cfg in configs.items():
        report = size_report(cfg, args.seq_len)
        say(f"{label}: {report.total_params / 1e9:.3f}B params, "
            f"{report.flops_forward_backward_mixed / 1e9:.2f} GFLOP/token fwd+bwd")
    if world > 1:
        say(f"FSDP2 over {world} processes, each {args.accum_steps} micro-batch(es) of {args.micro_batch} x "
            f"{args.seq_len} per step; figures per GPU")

    if device.type == "cuda" and any("-master" in mode for mode in args.modes) and main_process:
        check_master_update(device)
    if device.type == "cuda" and main_process:
        check_tower_mm(device)
    results = []
    for mode in args.modes:
        for variant in args.variants:
            results.append(run_variant(variant, configs[variant], mode, args, device))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the last variant's weights and optimizer state are gone
    if main_process:
        print_table(results, args, peak)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    if world > 1:
        torch.distributed.barrier()  # rank 0 may still be writing while the others tear down
        torch.distributed.destroy_process_group()
    return 0


def print_table(results: list[dict], args, peak: float | None) -> None:
    print(f"\n{'variant':<8}{'mode':<37}{'ms/step':>9}{'min-max':>15}{'fwd+bwd':>9}{'optim':>7}{'tokens/s':>10}"
          f"{'MFU':>7}{'MFU f+b':>8}{'GiB':>6}{'x dense':>8}{'x f+b':>7}{f'x@acc{args.accum}':>9}{'recomp':>7}")
    for r in results:
        dense = next((d for d in results if d["name"] == "dense" and d["mode"] == r["mode"]), None)
        ratio = r["ms"] / dense["ms"] if dense else float("nan")
        fb_ratio = r["fwd_bwd_ms"] / dense["fwd_bwd_ms"] if dense else float("nan")
        # One optimizer step per `accum` micro-batches, as training with gradient accumulation runs.
        per_update = lambda x: args.accum * x["fwd_bwd_ms"] / args.accum_steps + x["optimizer_ms"]
        acc_ratio = per_update(r) / per_update(dense) if dense else float("nan")
        mfu = f"{100 * r['tflops'] * 1e12 / peak:.1f}%" if peak else "-"
        fb_mfu = f"{100 * r['fwd_bwd_tflops'] * 1e12 / peak:.1f}%" if peak else "-"
        print(f"{r['name']:<8}{r['mode']:<37}{r['ms']:>9.2f}{r['min_ms']:>7.1f}-{r['max_ms']:<7.1f}"
              f"{r['fwd_bwd_ms']:>9.2f}{r['optimizer_ms']:>7.2f}{r['tokens_per_s']:>10.0f}{mfu:>7}{fb_mfu:>8}"
              f"{r['peak_gib']:>6.1f}{ratio:>8.3f}{fb_ratio:>7.3f}{acc_ratio:>9.3f}"
              f"{'-' if r['recompiles'] is None else r['recompiles']:>7}")
    if not args.baseline:
        return
    one_gpu = json.loads(Path(args.baseline).read_text())["results"]
    print(f"\nper GPU against 1 GPU ({args.baseline}):")
    print(f"{'variant':<8}{'mode':<37}{'1 GPU tok/s':>12}{'per GPU tok/s':>14}{'ratio':>7}{'f+b ratio':>10}")
    for r in results:
        one_gpu_mode = r["mode"].replace("-prefetch", "").replace("-keep", "")
        base = next((b for b in one_gpu if b["name"] == r["name"] and b["mode"] == one_gpu_mode), None)
        if base is None:
            continue
        print(f"{r['name']:<8}{r['mode']:<37}{base['tokens_per_s']:>12.0f}{r['tokens_per_s']:>14.0f}"
              f"{r['tokens_per_s'] / base['tokens_per_s']:>7.3f}{base['fwd_bwd_ms'] / r['fwd_bwd_ms']:>10.3f}")


if __name__ == "__main__":
    sys.exit(main())
