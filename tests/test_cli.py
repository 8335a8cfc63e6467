"""The command line: `mot flops` and the placeholder main job, run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_mot_flops_prints_mot_and_dense():
    paper = sorted(str(p) for p in (REPO / "recipes" / "paper").glob("*.toml"))
    result = _run("-m", "mot.cli", "flops", "recipes/demo.toml", *paper)
    assert result.returncode == 0, result.stderr
    assert "MoT / dense" in result.stdout
    assert "total params" in result.stdout
    assert "MoT vs dense across recipes" in result.stdout


def test_bad_override_fails_with_the_key_named():
    result = _run("-m", "mot.cli", "flops", "recipes/demo.toml", "--model.dimm=3")
    assert result.returncode == 2
    assert "unknown key 'model.dimm' (did you mean 'dim'?)" in result.stderr


def test_train_placeholder_runs_mot_and_dense():
    result = _run("train_mot.py", "--train.seq_len=64", "--train.batch_size=2")
    assert result.returncode == 0, result.stderr
    assert "MoT" in result.stdout and "dense" in result.stdout
