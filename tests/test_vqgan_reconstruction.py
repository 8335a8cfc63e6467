"""docs/results/scaling/vqgan_reconstruction.py: its measures against numbers worked out by hand, and a run of the
script on a few images with the shipped demo VQGAN."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "results" / "scaling" / "vqgan_reconstruction.py"


def load_script():
    spec = importlib.util.spec_from_file_location("vqgan_reconstruction", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measures_by_hand():
    original = np.zeros((2, 2, 2, 3), dtype=np.uint8)
    decoded = original.copy()
    decoded[0, 0, 0, 0] = 12  # image 0: one error of 12 over 12 values -> mse 12, mae 1
    decoded[1] = 3  # image 1: every value off by 3 -> mse 9
    codes = np.array([[0, 0, 1, 1], [2, 2, 2, 2]])  # uses 0, 1 and 2 with shares 1/4, 1/4, 1/2
    m = load_script().measures(original, decoded, codes, vocab=8)
    psnr = [10 * math.log10(255**2 / 12), 10 * math.log10(255**2 / 9)]
    assert m["psnr_mean"] == pytest.approx(sum(psnr) / 2) and m["psnr_median"] == pytest.approx(sum(psnr) / 2)
    assert m["mean_abs_error"] == pytest.approx((12 + 3 * 12) / 24)
    assert m["codes_used"] == 3 and m["code_perplexity"] == pytest.approx(2 ** 1.5)


def test_the_script_reports_each_kind_and_writes_its_grid(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--samples", "12", "--out", str(tmp_path),
                           "--icons", str(tmp_path / "no-icons")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())["kinds"]
    assert set(report) == {"demo shapes (its training data)", "scenes"}  # no icon theme here: left out, said so
    assert "no icons at" in proc.stdout and (tmp_path / "grid.png").stat().st_size > 0
    assert all(m["images"] == 12 and 5 < m["psnr_mean"] < 60 for m in report.values())
