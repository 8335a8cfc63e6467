"""Every benchmark script that has a --smoke mode runs it in CI (on the CPU), so that none can rot unseen.
bench/prepare.py and bench/chameleon_pipeline.py have their own tests, which check their numbers too."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ROUTING_ROWS = ("dense (one tower)", "boolean mask per linear", "sorted once, split + matmul",
                "sorted once, torch._grouped_mm")
GEMM_CASES = ("fwd dense", "fwd grouped", "fwd per-tower", "dgrad dense", "dgrad grouped", "dgrad per-tower",
              "wgrad dense", "wgrad grouped", "wgrad per-tower", "wgrad+acc dense bf16+stash",
              "wgrad+acc dense fused", "wgrad+acc grouped bf16+stash", "wgrad+acc per-tower fused")


def smoke(script: str, cwd: Path) -> str:
    """The script's --smoke output. One thread per process: tiny shapes gain nothing from more, and on a busy
    2-core machine threads that wait for each other spin for most of the run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("script, expect", [
    ("step_replay.py", "eager-sdpa-fused-closs"),  # the CPU runs the modes eager with SDPA masks
    ("generate.py", "text, batch 8"),
    ("grow.py", "written:"),
    ("fsdp_memory.py", "| 8 | "),
    ("decode_ops.py", "one eager text step:"),
])
def test_bench_smoke_runs(script, expect, tmp_path):
    assert expect in smoke(script, tmp_path)


def test_step_smoke_times_the_trainer_update_for_both_variants(tmp_path):
    out = smoke("step.py", tmp_path)
    rows = {line.split()[1]: line.split() for line in out.splitlines() if re.match(r"^ +512 (dense|mot) ", line)}
    assert set(rows) == {"dense", "mot"}
    assert float(rows["dense"][-1]) == 1.0 and float(rows["mot"][-1]) > 0  # the ratio column, dense against itself
    assert re.search(r"^corpus: \d+ documents, [\d,]+ random ids", out, re.M)


def test_routing_smoke_checks_and_times_every_routing(tmp_path):
    out = smoke("routing.py", tmp_path)
    for label in ("sorted/split", "sorted/grouped", "sorted/grouped fp32 weights under bf16 autocast",
                  "sorted/split fp32"):
        assert f"check {label} vs mask oracle" in out
    assert "speech-tower grads nonzero in none" in out
    for row in ROUTING_ROWS:  # eager and compiled (Dynamo's eager backend), both timed
        assert re.search(rf"^\| {re.escape(row)} \| [\d.]+ .*\| [\d.]+ \(", out, re.M), row
    # The grouped kernel's shapes are static: new modality layouts compile no new graph (bench/NOTES.md).
    grouped = out[out.index("sorted once, torch._grouped_mm (compiled)"):]
    assert "3 new modality layouts -> 0 new graph(s) compiled" in grouped


def test_determinism_smoke_repeats_both_variants_bit_for_bit(tmp_path):
    out = smoke("determinism.py", tmp_path)
    rows = {line.split()[0]: line.split() for line in out.splitlines() if re.match(r"^(dense|mot) +default ", line)}
    assert set(rows) == {"dense", "mot"}
    assert all(row[2] == "True" and row[3] == "-" for row in rows.values())  # the CPU's eager fp32 is deterministic


def test_determinism_report_finds_where_repeats_part():
    """compare_repeats against numbers worked out by hand: the first differing step (1-based) of each repeat,
    the largest loss and weight differences over the repeats."""
    compare_repeats = load_bench("determinism").compare_repeats
    w = {"a": torch.zeros(3), "b": torch.ones(2)}
    record = lambda losses, weights: {"losses": losses, "seconds": [0.01] * 4, "warnings": [], "weights": weights}
    first = record([3.0, 2.0, 1.5, 1.25], w)
    same = record([3.0, 2.0, 1.5, 1.25], {k: v.clone() for k, v in w.items()})
    parts = record([3.0, 2.0, 1.5 + 2**-20, 1.0], {"a": torch.tensor([0.0, -0.5, 0.0]), "b": torch.ones(2)})
    report = compare_repeats([first, same, parts])
    assert report["first_parting_step"] == [None, 3] and not report["identical"]
    assert report["max_loss_difference"] == 0.25 and report["max_weight_difference"] == 0.5
    assert compare_repeats([first, same])["identical"]


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_routing_check_fails_on_a_routing_mistake(monkeypatch):
    """bench/routing.py's checks: towers swapped round fail every one of them, each failure named with its error
    and tolerance (main raises them after the timings)."""
    bench = load_bench("routing")
    from mot.config import ModalityConfig, ModelConfig
    from mot.data.synthetic import bench_layout
    from mot.model import MoTTransformer

    right = bench.sorted_blocks
    monkeypatch.setattr(bench, "sorted_blocks", lambda model, x, modality: right(model, x, (modality + 1) % 3))
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=128,
                      modalities=[ModalityConfig(name, 16) for name in ("text", "image", "speech")])
    model = MoTTransformer(cfg).to(torch.bfloat16)
    x = torch.randn(2, 128, 32, dtype=torch.bfloat16, requires_grad=True)
    failures = bench.check(model, x, bench_layout(128), torch.randn_like(x))
    with pytest.raises(AssertionError) as failed:
        bench.assert_checks(failures)
    message = str(failed.value)
    for label, dtype in (("sorted/split", "bfloat16"), ("sorted/grouped", "bfloat16"),
                         ("sorted/grouped fp32 weights under bf16 autocast", "bfloat16"),
                         ("sorted/split fp32", "float32")):
        for quantity in ("output", "weight grad"):
            assert re.search(rf"^  {re.escape(label)}: {quantity} rel err \S+ .*above the {dtype} tolerance",
                             message, re.M), (label, quantity, message)
    assert "zero-count tower (grouped): speech-tower grads nonzero in" in message


def test_multi_gpu_smoke_one_process_against_two(tmp_path):
    out = smoke("multi_gpu.py", tmp_path)
    assert "FAILED" not in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("1gpu ", "2gpu-ddp "))}
    assert set(rows) == {"1gpu", "2gpu-ddp"}
    assert rows["1gpu"][1] == "1" and rows["2gpu-ddp"][1] == "2"
    # fp32 on the CPU, the same global batches: the two curves differ by reduction order alone.
    assert float(rows["2gpu-ddp"][-2]) <= 1e-3


def test_prepare_main_process_smoke_profiles_the_main_process(tmp_path):
    out = smoke("prepare_main_process.py", tmp_path)
    documents = re.search(r"^(\d+) documents, (\d+) tokens", out, re.M)
    assert documents and int(documents[1]) > 0 and int(documents[2]) > 0
    assert re.search(r"^main process: \d+ us per document", out, re.M)
    assert "Ordered by: internal time" in out


def test_tower_gemm_smoke_times_every_case(tmp_path):
    out = smoke("tower_gemm.py", tmp_path)
    for projection in ("qkv", "out", "w13", "w2"):
        for case in GEMM_CASES:
            assert re.search(rf"^{projection} N=256 {re.escape(case)} +[\d.]+ ms", out, re.M), (projection, case)
    summed = out[out.index("sum over the four projections"):]
    assert all(re.search(rf"^N=256 {re.escape(case)} +[\d.]+ ms", summed, re.M) for case in GEMM_CASES)


def test_transfusion_smoke_trains_and_checks_both_objectives(tmp_path):
    out = smoke("transfusion.py", tmp_path)
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("ar ", "diffusion "))}
    assert set(rows) == {"ar", "diffusion"}
    assert all(row[-2].endswith("%") for row in rows.values())  # the colour match
    assert "colour match: 12 captions" in out
