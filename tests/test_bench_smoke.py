"""Every benchmark script that has a --smoke mode runs it in CI (on the CPU), so that none can rot unseen.
bench/prepare.py and bench/chameleon_pipeline.py have their own tests, which check their numbers too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, expect", [
    ("step.py", "eager-sdpa-fused-closs"),  # the CPU runs the modes eager with SDPA masks
    ("generate.py", "text, batch 8"),
    ("grow.py", "written:"),
])
def test_bench_smoke_runs(script, expect, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert expect in proc.stdout
