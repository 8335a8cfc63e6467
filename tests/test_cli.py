"""The command line: `mot flops` and `train_mot.py`, run as a user would."""

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
    assert "latent projections" not in result.stdout  # all-AR recipes


def test_mot_flops_shows_the_latent_projections_of_a_diffusion_recipe():
    result = _run("-m", "mot.cli", "flops", "recipes/demo_transfusion.toml")
    assert result.returncode == 0, result.stderr
    # The demo VQGAN's 32 channels, d = 128: in 32*128+128, timestep MLP 256*128+128 + 128*128+128,
    # out 128*32+32 = 57,760 parameters, the same in MoT and dense.
    assert "of which latent projections" in result.stdout and "57.76K" in result.stdout


def test_bad_override_fails_with_the_key_named():
    result = _run("-m", "mot.cli", "flops", "recipes/demo.toml", "--model.dimm=3")
    assert result.returncode == 2
    assert "unknown key 'model.dimm' (did you mean 'dim'?)" in result.stderr


def test_train_mot_checks_the_recipe_before_any_work():
    result = _run("train_mot.py", "--train.warmup_steps=5000", "--train.out_dir=/nonexistent/runs")
    assert result.returncode == 2
    assert "'train.warmup_steps' (5000) exceeds train.steps (600)" in result.stderr
    assert not Path("/nonexistent/runs").exists()
