"""A `TrainState` to a checkpoint and back (the folder format is mot/train/checkpoint.py's).

    save_state(state)          # RUN/checkpoints/step-NNNNNNN, atomically; a collective under FSDP
    load_state(state, path)    # weights, optimizer, schedule, loader, RNG and counters, as they were
"""

from __future__ import annotations

from pathlib import Path

from mot.config import ConfigError, config_to_dict
from mot.runs import load_model_state
from mot.train.checkpoint import load_training_state, python_rng_state, restore_rng, save_checkpoint
from mot.train.state import TrainState


def save_state(state: TrainState) -> Path | None:
    """Checkpoint the run at its current step: full fp32 weights (the masters under master weights), the
    optimizer, RNG and `state.state_dict()`; a collective under FSDP. The path on the main process, else None."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    acc, cfg = state.accelerator, state.cfg
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(state.model, options=options)  # collective under FSDP
    if state.master_weights:  # the checkpoint's weights are the fp32 masters, not the bf16 compute copies
        model_state.update({k: v.detach().cpu() for k, v in state.inner_optimizer.master_state_dict().items()})
    optimizer_state = get_optimizer_state_dict(state.model, state.optimizer, options=options)
    path = None
    if acc.is_main_process:
        meta = {**state.state_dict(), "python_rng": python_rng_state(), "config": config_to_dict(cfg),
                "tokenizers": str(Path(cfg.data.tokenizers).resolve()) if cfg.data.tokenizers else ""}
        del meta["step"]  # save_checkpoint writes it
        path = save_checkpoint(state.run_dir / "checkpoints", state.step, model_state, optimizer_state, meta,
                               keep=cfg.train.keep_checkpoints)
    acc.wait_for_everyone()
    return path


# Model keys that choose how the same computation runs, not what it computes: a run may resume with another.
HOW_NOT_WHAT = ("kernels",)


def _model_diff(a: dict, b: dict) -> list[str]:
    keys = sorted((set(a) | set(b)) - set(HOW_NOT_WHAT))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def load_state(state: TrainState, path: Path) -> None:
    """Resume `state` from checkpoint `path`: weights, optimizer, schedule, loader, RNG and counters. The model
    and `train.freeze` must be the checkpoint's (a ConfigError names what differs)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    where, cfg = state.where, state.cfg
    optimizer_state, rng, meta = load_training_state(path)
    if meta.get("weights_only"):
        raise ConfigError(f"{where}: {path} holds weights only (mot {meta.get('operation')}); "
                          f"start a run from it with --init-from {path}")
    diff = _model_diff(meta["config"]["model"], config_to_dict(cfg)["model"])
    if diff:
        raise ConfigError(f"{where}: cannot resume from {path}: the model differs from the checkpoint's "
                          f"({'; '.join(diff)})")
    saved_freeze = meta["config"].get("train", {}).get("freeze", [])
    if saved_freeze != cfg.train.freeze:  # the optimizer's groups and zero moments depend on it
        raise ConfigError(f"{where}: cannot resume from {path} with train.freeze = {cfg.train.freeze}: "
                          f"it was trained with {saved_freeze}; start a new run with --init-from {path}")
    options = StateDictOptions(full_state_dict=True)
    model_state = load_model_state(path)
    set_model_state_dict(state.model, model_state, options=options)
    if state.master_weights:  # the fp32 weights as saved, not the bf16 copies the model now holds
        state.inner_optimizer.load_masters(model_state)
    set_optimizer_state_dict(state.model, state.optimizer, optimizer_state, options=options)
    state.load_state_dict(meta)
    restore_rng(rng, meta.get("python_rng"))
    if state.accelerator.is_main_process:
        print(f"mot: resumed from {path} at step {state.step}")
