"""Checkpoints: a folder per step, written atomically, the last K kept.

    RUN/checkpoints/step-000300/
        model.safetensors     full fp32 weights (tied tensors stored once, see `aliases` in meta.json)
        optimizer.pt          AdamW state keyed by parameter name (read with weights_only=True)
        rng.pt                torch (CPU and CUDA) RNG states
        meta.json             step, schedule, data-loader state, counters, the resolved run config

Everything is written into a hidden `.tmp-*` folder first and renamed into place only when complete, so a
process killed mid-write leaves the previous checkpoints as they were; half-written folders are never listed
and are cleared by the next save. This module writes them and reads back the training state to resume (a
`TrainState` goes through mot/train/state_io.py); reading a run's weights and meta, for inference or anything
else, is mot/runs.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mot.runs import CHECKPOINT_VERSION, FILES, checkpoint_name, list_checkpoints, read_meta


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


def load_training_state(path: str | Path) -> tuple[dict, dict, dict[str, Any]]:
    """(optimizer state, RNG state, meta) of a checkpoint; pickles are read with weights_only=True."""
    path = Path(path)
    meta = read_meta(path)
    optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    return optimizer, rng, meta



