"""The block's projections three ways, one GEMM at a time: dense (cuBLAS), grouped (`torch._grouped_mm`) and per
tower (one cuBLAS GEMM per tower slice, written into slices of one output), at the ~1B recipe's shapes.

    python3 bench/tower_gemm.py [--dim 2048 --tokens 8192 16384]
    python3 bench/tower_gemm.py --smoke     # tiny shapes on the CPU, seconds: checks the script

For every projection (QKV, attention out, FFN w13 and w2) and every token count it times the forward
(x @ W.T), the input gradient (dy @ W) and the weight gradient (dy.T @ x), the last also with the fp32
accumulation that gradient accumulation needs: "bf16 + stash" (the bf16 gradient, then one fp32 add, which is
what MasterWeightAdamW.stash_gradients does) against "fused" (`addmm` with an fp32 output accumulating in
place: cuBLAS reads and writes the fp32 sum in its epilogue). The tokens are split over the 3 towers in the
demo layout's proportions (1656 / 5120 / 1416 of 8192). Median of triton's do_bench (L2 flushed), in ms, and
the ratio to dense. On the CPU (--smoke) the times are host-timed and "fused" casts the operands to fp32 first
(the CPU has no addmm with an fp32 output of bf16 operands), so only the script is checked, not the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def split(n: int) -> list[int]:
    text, speech = round(n * 1656 / 8192), round(n * 1416 / 8192)
    return [text, n - text - speech, speech]


def bounds(counts: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def bench_ms(fn, dev: str) -> float:
    """Median ms of fn: triton's do_bench on the GPU; on the CPU a few host-timed calls."""
    if dev == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200)
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def addmm_dtype_out(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a @ b, bf16 operands into the fp32 total in one cuBLAS call."""
    torch.ops.aten.addmm.dtype_out(total, a, b, torch.float32, out=total)


def addmm_upcast(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """The CPU's stand-in for addmm_dtype_out, which has no CPU kernel."""
    total.addmm_(a.float(), b.float())


def time_projection(name: str, n: int, d_in: int, d_out: int, dev: str, towers: int = 3
                    ) -> list[tuple[str, float]]:
    fused_addmm = addmm_dtype_out if dev == "cuda" else addmm_upcast
    counts = split(n)
    rows = bounds(counts)
    offs = torch.tensor([b for _, b in rows], device=dev, dtype=torch.int32)
    x = torch.randn(n, d_in, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(n, d_out, device=dev, dtype=torch.bfloat16)
    w_dense = torch.randn(d_out, d_in, device=dev, dtype=torch.bfloat16) / d_in**0.5
    w = torch.randn(towers, d_out, d_in, device=dev, dtype=torch.bfloat16) / d_in**0.5
    y = torch.empty(n, d_out, device=dev, dtype=torch.bfloat16)
    dx = torch.empty(n, d_in, device=dev, dtype=torch.bfloat16)
    dw = torch.empty_like(w)
    dw_sum = torch.zeros(towers, d_out, d_in, device=dev, dtype=torch.float32)
    dw_dense_sum = torch.zeros(d_out, d_in, device=dev, dtype=torch.float32)
    dw_dense = torch.empty_like(w_dense)

    def per_tower_fwd():
        for i, (a, b) in enumerate(rows):
            torch.mm(x[a:b], w[i].t(), out=y[a:b])

    def per_tower_dgrad():
        for i, (a, b) in enumerate(rows):
            torch.mm(dy[a:b], w[i], out=dx[a:b])

    def per_tower_wgrad():
        for i, (a, b) in enumerate(rows):
            torch.mm(dy[a:b].t(), x[a:b], out=dw[i])

    def per_tower_wgrad_fused():
        for i, (a, b) in enumerate(rows):
            fused_addmm(dw_sum[i], dy[a:b].t(), x[a:b])

    def grouped_wgrad_stash():
        g = torch._grouped_mm(dy.t(), x, offs=offs)
        dw_sum.add_(g)

    def dense_wgrad_stash():
        torch.mm(dy.t(), x, out=dw_dense)
        dw_dense_sum.add_(dw_dense)

    def dense_wgrad_fused():
        fused_addmm(dw_dense_sum, dy.t(), x)

    # Correctness of the per-tower and grouped forms against a float32 loop.
    ref = torch.cat([x[a:b].float() @ w[i].float().t() for i, (a, b) in enumerate(rows)])
    per_tower_fwd()
    grouped = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    for got in (y, grouped):
        torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
    per_tower_wgrad()
    torch.testing.assert_close(torch._grouped_mm(dy.t(), x, offs=offs), dw)

    cases = [
        ("fwd dense", lambda: torch.mm(x, w_dense.t())),
        ("fwd grouped", lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)),
        ("fwd per-tower", per_tower_fwd),
        ("dgrad dense", lambda: torch.mm(dy, w_dense)),
        ("dgrad grouped", lambda: torch._grouped_mm(dy, w, offs=offs)),
        ("dgrad per-tower", per_tower_dgrad),
        ("wgrad dense", lambda: torch.mm(dy.t(), x)),
        ("wgrad grouped", lambda: torch._grouped_mm(dy.t(), x, offs=offs)),
        ("wgrad per-tower", per_tower_wgrad),
        ("wgrad+acc dense bf16+stash", dense_wgrad_stash),
        ("wgrad+acc dense fused", dense_wgrad_fused),
        ("wgrad+acc grouped bf16+stash", grouped_wgrad_stash),
        ("wgrad+acc per-tower fused", per_tower_wgrad_fused),
    ]
    return [(f"{name} N={n} {label}", bench_ms(fn, dev)) for label, fn in cases]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script")
    args = parser.parse_args()
    if args.smoke:
        dev, args.dim, args.ffn, args.tokens = "cpu", 64, 128, [256]
    elif torch.cuda.is_available():
        dev = "cuda"
    else:
        sys.exit("bench/tower_gemm.py needs a CUDA GPU (or --smoke)")
    print(f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, torch {torch.__version__}")
    d, h = args.dim, args.ffn
    shapes = [("qkv", d, 3 * d), ("out", d, d), ("w13", d, 2 * h), ("w2", h, d)]
    totals: dict[tuple[int, str], float] = {}
    for n in args.tokens:
        for name, d_in, d_out in shapes:
            results = time_projection(name, n, d_in, d_out, dev)
            dense = {}
            for label, ms in results:
                kind, method = label.split()[2], " ".join(label.split()[3:])
                dense.setdefault(kind, ms)
                totals[(n, f"{kind} {method}")] = totals.get((n, f"{kind} {method}"), 0.0) + ms
                print(f"{label:<48} {ms:8.4f} ms  x{ms / dense[kind]:.3f}")
    print("\nsum over the four projections (one layer)")
    for n in args.tokens:
        base: dict[str, float] = {}
        for (tokens, label), ms in totals.items():
            if tokens != n:
                continue
            kind = label.split()[0]
            base.setdefault(kind, ms)
            print(f"N={n} {label:<36} {ms:8.4f} ms  x{ms / base[kind]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
