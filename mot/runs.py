"""A run folder on disk, read: its checkpoints, their meta and weights, and a model ready for inference.

    RUN/checkpoints/step-0000300/   model.safetensors, optimizer.pt, rng.pt, meta.json (mot/train/checkpoint.py
                                    writes them)
    RUN/tokenizers/                 the tokenizers it was trained with
    RUN/recipe.toml, RUN/config.json

Generation, serving, import/export and the trainer read runs through this module; only the trainer writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mot.config import RunConfig, config_from_dict

CHECKPOINT_VERSION = 1
PREFIX = "step-"
FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "meta.json")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or of another model; the message names the folder."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint folder named by checkpoint_name."""
    return int(Path(path).name[len(PREFIX):])


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints under `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted((p for p in found if all((p / f).is_file() for f in FILES)), key=checkpoint_step)


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path}: not a complete checkpoint (missing {missing})")
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')}, expected {CHECKPOINT_VERSION}")
    return meta


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    meta = read_meta(path)
    state = load_file(str(path / "model.safetensors"))
    for alias, original in meta["aliases"].items():
        state[alias] = state[original]
    return state


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder / its checkpoints folder (then its latest checkpoint)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for folder in (path / "checkpoints", path):
        found = latest_checkpoint(folder)
        if found is not None:
            return found
    raise CheckpointError(f"{path}: no checkpoint here (expected a step-* folder, or a run folder holding them)")


def load_weights(model, path: Path) -> None:
    """A checkpoint folder's weights into `model`; a CheckpointError when they do not fit."""
    try:
        model.load_state_dict(load_model_state(path))
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the model of its config: {err}") from None


def load_for_inference(path: str | Path):
    """(model in eval mode on the CPU, its RunConfig, the tokenizers folder or None) from a checkpoint or a
    run folder (its latest checkpoint)."""
    from mot.model import MoTTransformer

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    cfg: RunConfig = config_from_dict(meta["config"], where=f"{ckpt}/meta.json")
    model = MoTTransformer(cfg.model)
    load_weights(model, ckpt)
    run_dir = ckpt.parent.parent
    tokenizers = run_dir / "tokenizers"
    if not tokenizers.is_dir():
        tokenizers = Path(meta.get("tokenizers") or "")
    return model.eval(), cfg, (tokenizers if str(tokenizers) and tokenizers.is_dir() else None)
