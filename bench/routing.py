"""Routing benchmark: forward+backward of a stack of MoT blocks, dense vs mask vs sorted routing.

    python bench/routing.py [--dim 2048 --layers 4 --seq-len 4096 --steps 20] [--json OUT.json]
    python bench/routing.py --smoke      # tiny sizes on the CPU, seconds: checks the script

Runs on one CUDA GPU in bf16. First checks each routing against the mask-routed
oracle on the same weights (outputs and weight gradients, relative error), and
that a tower with no tokens gets an exactly-zero gradient through the grouped
kernel; then times every variant eager and under torch.compile in one run and
prints ms, TFLOP/s (from mot/flops.py, causal attention) and the ratio to dense.
Last, it asserts the checks: errors within TOLERANCE for the dtype the matmuls
ran in, zero gradients exactly zero.
On the CPU the routes drop their host counts and the grouped variant forces
`torch._grouped_mm` (`Kernels("grouped")`), so the split and grouped paths run as they do on CUDA;
--smoke compiles with Dynamo's eager backend (graphs and recompiles, no inductor).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mot.config import ModalityConfig, ModelConfig  # noqa: E402
from mot.data.synthetic import bench_layout, random_layout  # noqa: E402
from mot.flops import attention_flops_per_token  # noqa: E402
from mot.model import MoTTransformer  # noqa: E402
from mot.model.kernels import Kernels  # noqa: E402
from mot.model.reference import mask_routed_blocks  # noqa: E402

# Relative (Frobenius) error of each routing against the fp32 mask oracle, by the dtype its matmuls run in.
# bf16: a few times what bf16 rounding gives (bench/NOTES.md, Routing), far below a routing mistake's error (of
# order 1); fp32: fp32 rounding, with TF32 off (torch's default).
TOLERANCE = {
    torch.bfloat16: {"output": 2e-2, "weight grad": 4e-2},
    torch.float32: {"output": 1e-5, "weight grad": 1e-5},
}


def mask_blocks(model, x, modality):
    return mask_routed_blocks(model, x, modality, fast=True)


SPLIT = Kernels("split")


def grouped_kernels(device: torch.device) -> Kernels:
    """The kernels that take `torch._grouped_mm` here: "auto" picks it on CUDA, the CPU only when forced."""
    return Kernels("auto" if device.type == "cuda" else "grouped")


def block_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """fwd+bwd FLOPs per token of the blocks alone (no embedding or head)."""
    matmul = cfg.n_layers * (4 * cfg.dim**2 + 3 * cfg.dim * cfg.ffn_hidden)
    return 3 * (2 * matmul + attention_flops_per_token(cfg, seq_len, "causal"))


def sorted_blocks(model: MoTTransformer, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    batch, seq_len, dim = x.shape
    route = model.route(modality)
    if route.host_counts is not None:  # a CPU route: its counts would send every projection to per-tower GEMMs
        route = dataclasses.replace(route, host_counts=None)
    rows = model.run_blocks(route.sort(x.reshape(-1, dim)), route, batch, seq_len)
    return route.unsort(rows).view(batch, seq_len, dim)


def time_ms(fn, steps: int, warmup: int = 5) -> list[float]:
    """Per-step times from CUDA events (host clock on the CPU, for smoke runs)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return times
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def recompiles_for_new_layouts(fn_run, model, x, grad_out, kernels, seq_len) -> str:
    """Run a compiled variant on three new modality layouts; count the graphs Dynamo compiles."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        layout = random_layout(x.shape[0], seq_len, [0, 1, 2], 1500, gen).to(x.device)
        model.kernels = kernels
        fn_run(model, x, layout).backward(grad_out)
        model.zero_grad(set_to_none=True)
    return f"3 new modality layouts -> {counters['stats']['unique_graphs'] - before} new graph(s) compiled"


KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention")),
    ("matmul", ("gemm", "cutlass", "sm90", "nvjet", "cublas", "matmul", "_mm_")),
    ("permute/gather", ("index", "gather", "scatter")),
)


def kernel_breakdown(fn, label: str, folder: Path) -> str:
    """Profile 3 steps; GPU time per kernel kind (ms per step) and the full table in a file."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    for avg in prof.key_averages():
        us = getattr(avg, "self_device_time_total", None) or getattr(avg, "self_cuda_time_total", 0)
        if us <= 0:
            continue
        name = avg.key.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(key in name for key in keys)), "other (fused/elementwise)")
        kinds[kind] = kinds.get(kind, 0.0) + us / 3e3
    folder.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() else "_" for c in label)
    sort_key = "self_device_time_total" if hasattr(prof.key_averages()[0], "self_device_time_total") else None
    (folder / f"{safe}.txt").write_text(prof.key_averages().table(sort_by=sort_key or "self_cuda_time_total",
                                                                  row_limit=40))
    parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return f"  GPU ms/step by kernel kind: {parts} (total {sum(kinds.values()):.2f})"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def grads_of(model, run, x, modality, grad_out):
    model.zero_grad(set_to_none=True)
    out = run(model, x, modality)
    out.backward(grad_out)
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(label: str, dtype: torch.dtype, out, grads, ref_out, ref_grads) -> tuple[str, list[str]]:
    """The check's printed line, and a failure message for each error above the dtype's tolerance."""
    grad_errors = {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads}
    worst = max(grad_errors, key=grad_errors.get)
    errors = {"output": rel_err(out, ref_out), "weight grad": grad_errors[worst]}
    tolerance = TOLERANCE[dtype]
    dtype_name = str(dtype).removeprefix("torch.")
    line = (f"check {label} vs mask oracle (fp32): output rel err {errors['output']:.2e}, worst weight-grad "
            f"rel err {errors['weight grad']:.2e} ({worst}); {dtype_name} tolerances "
            f"{tolerance['output']:.0e} / {tolerance['weight grad']:.0e}")
    failures = [f"{label}: {quantity} rel err {err:.2e}{f' ({worst})' if quantity == 'weight grad' else ''} "
                f"above the {dtype_name} tolerance {tolerance[quantity]:.0e}"
                for quantity, err in errors.items() if not err <= tolerance[quantity]]  # NaN fails too
    return line, failures


def draw_norm_gains(model: MoTTransformer, seed: int = 0) -> None:
    """Norm gains start at 1 in every tower, so a token normed by the wrong tower would go unseen: draw them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))


def check(model, x, modality, grad_out) -> list[str]:
    """Each routing against the mask oracle (fp32 copy of the same weights, norm gains drawn), and zero-count
    towers; prints a line per check and returns a failure message for each error above its tolerance."""
    grouped = grouped_kernels(x.device)
    model = copy.deepcopy(model)
    draw_norm_gains(model)
    oracle = copy.deepcopy(model).float()
    ref_out, ref_grads = grads_of(oracle, mask_blocks, x.float(), modality, grad_out.float())
    results = []
    for name, kernels in (("split", SPLIT), ("grouped", grouped)):
        model.kernels = kernels
        out, grads = grads_of(model, sorted_blocks, x, modality, grad_out)
        results.append(compare(f"sorted/{name}", x.dtype, out, grads, ref_out, ref_grads))
    # The trainer's mixed precision: fp32 weights under bf16 autocast take the grouped path too.
    fp32_model = copy.deepcopy(model).float()
    fp32_model.kernels = grouped
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out, grads = grads_of(fp32_model, sorted_blocks, x.float(), modality, grad_out.float())
    results.append(compare("sorted/grouped fp32 weights under bf16 autocast", torch.bfloat16, out, grads,
                           ref_out, ref_grads))
    # fp32 throughout (split: the grouped kernel is bf16 only on CUDA): held to fp32 rounding, so a routing
    # mistake too small to show through bf16 rounding still fails.
    fp32_model.kernels = SPLIT
    out, grads = grads_of(fp32_model, sorted_blocks, x.float(), modality, grad_out.float())
    results.append(compare("sorted/split fp32", torch.float32, out, grads, ref_out, ref_grads))
    # A batch with no speech tokens: the speech tower's gradients must be exactly zero.
    no_speech = torch.where(modality == 2, 0, modality)
    model.kernels = grouped
    _, grads = grads_of(model, sorted_blocks, x, no_speech, grad_out)
    leaked = [n for n, g in grads.items() if g.dim() >= 2 and g.shape[0] == 3 and g[2].abs().max() > 0]
    results.append((f"check zero-count tower (grouped): speech-tower grads nonzero in {leaked or 'none'}",
                    [f"zero-count tower (grouped): speech-tower grads nonzero in {leaked}"] if leaked else []))
    for line, _ in results:
        print(line, flush=True)
    return [f for _, fs in results for f in fs]


def assert_checks(failures: list[str]) -> None:
    if failures:
        raise AssertionError("routing checks failed:\n  " + "\n  ".join(failures))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile", default="", help="folder: write a kernel breakdown per compiled variant")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--autotune", action="store_true",
                        help="also time dense and grouped under torch.compile(mode='max-autotune-no-cudagraphs')")
    parser.add_argument("--json", type=str, default="")
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke run of the script")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script")
    args = parser.parse_args()
    if args.smoke:
        args.device, args.dim, args.heads, args.ffn, args.layers = "cpu", 64, 4, 128, 2
        args.seq_len, args.steps, args.warmup, args.autotune, args.profile = 256, 2, 1, False, ""

    torch.manual_seed(0)
    device = torch.device(args.device)
    modalities = [ModalityConfig("text", 64), ModalityConfig("image", 64), ModalityConfig("speech", 64)]
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, ffn_dim=args.ffn,
                      modalities=modalities, max_seq_len=args.seq_len)
    dense_cfg = copy.deepcopy(cfg)
    dense_cfg.untie = []
    mot = MoTTransformer(cfg).to(device, torch.bfloat16)
    dense = MoTTransformer(dense_cfg).to(device, torch.bfloat16)
    modality = bench_layout(args.seq_len).to(device)
    batch, seq_len = modality.shape
    x = torch.randn(batch, seq_len, args.dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn_like(x)
    counts = torch.bincount(modality.flatten()).tolist()
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {where}; d={args.dim} H={args.heads} "
          f"ffn={args.ffn} L={args.layers} tokens={batch}x{seq_len} counts={counts}")

    # A failed check is raised after the timings, so that a run on the GPU still gives its table.
    failures = check(mot, x, modality, grad_out)
    if failures:
        print("CHECKS FAILED (raised after the timings):\n  " + "\n  ".join(failures), flush=True)

    def step(model, run, kernels):
        def fn():
            model.kernels = kernels
            out = run(model, x, modality)
            out.backward(grad_out)
            model.zero_grad(set_to_none=True)
            x.grad = None
        return fn

    variants = [
        ("dense (one tower)", dense, sorted_blocks, Kernels()),
        ("boolean mask per linear", mot, mask_blocks, Kernels()),
        ("sorted once, split + matmul", mot, sorted_blocks, SPLIT),
        ("sorted once, torch._grouped_mm", mot, sorted_blocks, grouped_kernels(device)),
    ]
    flops = block_flops_per_token(cfg, seq_len) * batch * seq_len
    results = {}
    # (label, torch.compile keyword arguments or None for eager); the smoke traces the graphs with Dynamo but
    # leaves out inductor's CPU code generation, which is slow
    compiled_kwargs = {"backend": "eager"} if args.smoke else {}
    modes = [("eager", None)] + ([] if args.no_compile else [("compiled", compiled_kwargs)])
    if args.autotune:
        modes.append(("max-autotune", {"mode": "max-autotune-no-cudagraphs"}))
    for mode_name, compile_kwargs in modes:
        compiled = compile_kwargs is not None
        for name, model, run, kernels in variants:
            if mode_name == "max-autotune" and (run is not sorted_blocks or kernels is SPLIT):
                continue  # autotuning: dense and grouped only
            model.kernels = kernels
            fn_run = torch.compile(run, **compile_kwargs) if compiled else run
            label = f"{name} ({mode_name})"
            try:
                times = time_ms(step(model, fn_run, kernels), args.steps, args.warmup)
            except Exception as err:  # one variant failing must not hide the others
                print(f"{label} failed: {type(err).__name__}: {err}")
                continue
            results[(name, mode_name)] = times
            print(f"  {label}: median {statistics.median(times):.2f} ms", flush=True)
            if compiled and run is sorted_blocks:
                print("  " + recompiles_for_new_layouts(fn_run, model, x, grad_out, kernels, args.seq_len))
            if compiled and args.profile and run is not mask_blocks:
                print(kernel_breakdown(step(model, fn_run, kernels), label, Path(args.profile)))
            torch._dynamo.reset()

    print()
    mode_names = [m for m, _ in modes]
    print("| routing | " + " | ".join(f"{m} ms | x dense | TFLOP/s" for m in mode_names) + " |")
    print("|---|" + "---|---|---|" * len(modes))
    table = {}
    for name, *_ in variants:
        cells = [name]
        for mode_name in mode_names:
            times = results.get((name, mode_name))
            base = results.get((variants[0][0], mode_name))
            if not times or not base:
                cells += ["-", "-", "-"]
                continue
            med, base_med = statistics.median(times), statistics.median(base)
            spread = (max(times) - min(times)) / med
            cells += [f"{med:.2f} (±{100 * spread / 2:.0f}%)", f"{med / base_med:.3f}", f"{flops / med / 1e9:.0f}"]
            table[f"{name} {mode_name}"] = {"median_ms": med, "times_ms": times, "x_dense": med / base_med}
        print("| " + " | ".join(cells) + " |")
    print(f"\nmedian of {args.steps} steps after {args.warmup} warm-up; TFLOP/s = blocks' fwd+bwd FLOPs "
          f"({flops / 1e12:.2f} TFLOP/step, causal attention) / median time; ± = half the min-max spread")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    assert_checks(failures)


if __name__ == "__main__":
    main()
