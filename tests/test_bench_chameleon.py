"""bench/chameleon_pipeline.py --smoke: a Chameleon-layout release made here goes through import (with the taming
VQGAN), upcycle, prepare, LMFusion training and generation; the frozen text tower comes out unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_runs_every_step_and_keeps_the_text_tower(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "chameleon_pipeline.py"), "--smoke",
                           "--out-dir", str(tmp_path / "work"), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["step"] for r in results["steps"]] == [
        "make the release (random)", "import-hf (+ --vqgan)", "upcycle (text, image towers)", "synthetic tars",
        "prepare (imported tokenizers)", "train (text tower frozen)", "generate: guided image",
        "generate: text, 4 samples"]
    assert results["text_tower_unchanged"] and results["image_tower_trained"]
    assert results["prepared_tokens"] > 0 and len(results["train_log"]) == 3
    image_page = Path(results["pages"][0]).read_text()
    assert '<img src="image-sample1-image1.png"' in image_page  # the VQGAN's decoder drew the generated codes
    assert "| train (text tower frozen) |" in proc.stdout
