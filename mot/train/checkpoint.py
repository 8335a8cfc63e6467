"""Checkpoints: a folder per step, written atomically, the last K kept.

    RUN/checkpoints/step-000300/
        model.safetensors     full fp32 weights (tied tensors stored once, see `aliases` in meta.json)
        optimizer.pt          AdamW state keyed by parameter name (read with weights_only=True)
        rng.pt                torch (CPU and CUDA) RNG states
        meta.json             step, schedule, data-loader state, counters, the resolved run config

Everything is written into a hidden `.tmp-*` folder first and renamed into place only when complete, so a
process killed mid-write leaves the previous checkpoints as they were; half-written folders are never listed
and are cleared by the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mot.config import RunConfig, config_from_dict

CHECKPOINT_VERSION = 1
PREFIX = "step-"
FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "meta.json")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or of another model; the message names the folder."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints under `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[5:].isdigit()]
    return sorted((p for p in found if all((p / f).is_file() for f in FILES)), key=lambda p: int(p.name[5:]))


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied embeddings): keep one, record the alias."""
    kept, aliases, by_ptr = {}, {}, {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else None
        if key is not None and key in by_ptr:
            aliases[name] = by_ptr[key]
            continue
        if key is not None:
            by_ptr[key] = name
        kept[name] = tensor.contiguous()
    return kept, aliases


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def restore_rng(state: dict[str, Any], python_state: list | None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if python_state is not None:
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    folder: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` under `folder` atomically, then delete all but the newest `keep`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = folder / checkpoint_name(step)
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    tensors, aliases = _dedupe_shared(model_state)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(step)})
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    meta = {"version": CHECKPOINT_VERSION, "step": step, "aliases": aliases, **meta}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    for name in FILES:
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # saving the same step again (e.g. the final step was also a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(folder)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def load_training_state(path: str | Path) -> tuple[dict, dict, dict[str, Any]]:
    """(optimizer state, RNG state, meta) of a checkpoint; pickles are read with weights_only=True."""
    path = Path(path)
    meta = read_meta(path)
    optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    return optimizer, rng, meta


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
