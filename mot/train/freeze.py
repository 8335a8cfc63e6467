"""`train.freeze`: parts of the model that training leaves bit for bit as they were (LMFusion: a pretrained text
tower kept frozen while new image towers learn).

Entries of `train.freeze`:

    "tower:NAME"   modality NAME's own towers: its slice of every untied projection and norm (and its latent
                   projections under diffusion); parameters shared by all modalities are not touched
    "embed:NAME"   the embedding and output-head rows of NAME's id range (the specials stay trainable)
    any other      an fnmatch pattern over parameter names: "blocks.0.*", "final_norm.weight"

A parameter frozen whole gets `requires_grad = False`: no gradient, no optimizer state. A frozen slice of a
parameter that also has trainable parts (one tower of a projection, rows of the embedding) keeps the parameter
trainable: its gradient rows are zeroed before clipping and the step, so its AdamW moments stay zero and the
update leaves those rows exactly as they are; its weight decay is applied here, to the trainable rows only,
with the optimizer's own decay set to 0 for it. The slices' weight gradients are still computed.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from mot.config import ConfigError, ModelConfig
from mot.model.pattention import TowerPattention
from mot.model.routing import TowerHeadLayerNorm, TowerLinear, TowerRMSNorm
from mot.train.master_weights import MasterWeightAdamW
from mot.vocab import UnifiedVocab

# Modules that hold one slice per tower along dim 0 of their parameters (as mot.grow.TOWER_MODULES).
TOWER_MODULES = (TowerLinear, TowerRMSNorm, TowerHeadLayerNorm, TowerPattention)


@dataclass
class FrozenRows:
    """Rows (along dim 0) of one trainable parameter that must not change."""

    name: str
    param: nn.Parameter
    rows: torch.Tensor  # bool (param.shape[0],), True = frozen


def _rows_of(cfg: ModelConfig, model: nn.Module, entry: str) -> dict[str, torch.Tensor]:
    """name -> frozen-row mask of the parameters `entry` ("tower:X" / "embed:X") touches."""
    kind, _, modality = entry.partition(":")
    names = [m.name for m in cfg.modalities]
    if modality not in names:
        raise ConfigError(f"train.freeze: {entry!r} names no modality; have {names}")
    index = names.index(modality)
    out: dict[str, torch.Tensor] = {}
    if kind == "embed":
        r = UnifiedVocab(cfg)[modality]
        for name in ("embed.weight", "head.weight"):
            rows = torch.zeros(model.get_parameter(name).shape[0], dtype=torch.bool)
            rows[r.start : r.stop] = True
            out[name] = rows
        return out
    if cfg.is_dense:
        raise ConfigError(f"train.freeze: {entry!r} on a dense model (model.untie = []) would freeze every "
                          "modality's weights; upcycle it into towers first (mot upcycle), or name parameters")
    for module_name, module in model.named_modules():
        if isinstance(module, TOWER_MODULES):
            for name, param in module.named_parameters(recurse=False):
                if param.shape[0] > 1:  # one slice per modality; a shared (tied) component has one
                    rows = torch.zeros(param.shape[0], dtype=torch.bool)
                    rows[index] = True
                    out[f"{module_name}.{name}"] = rows
        if module_name == f"latent_io.{modality}":
            for name, param in module.named_parameters():
                out[f"{module_name}.{name}"] = torch.ones(param.shape[0], dtype=torch.bool)
    return out


def frozen_parts(cfg: ModelConfig, model: nn.Module, entries: list[str]) -> tuple[list[str], list[FrozenRows]]:
    """(names of the parameters frozen whole, the frozen rows of the others) for `train.freeze`."""
    params = dict(model.named_parameters(remove_duplicate=False))
    rows: dict[str, torch.Tensor] = {}
    for entry in entries:
        if entry.startswith(("tower:", "embed:")):
            for name, mask in _rows_of(cfg, model, entry).items():
                rows[name] = rows[name] | mask if name in rows else mask
            continue
        matched = fnmatch.filter(params, entry)
        if not matched:
            raise ConfigError(f"train.freeze: pattern {entry!r} matches no parameter (e.g. {next(iter(params))!r})")
        for name in matched:
            rows[name] = torch.ones(params[name].shape[0], dtype=torch.bool)
    # Tied parameters (the head sharing the embedding's tensor): one entry per tensor, the union of the rows.
    by_tensor: dict[int, tuple[str, torch.Tensor]] = {}
    for name, mask in rows.items():
        key = id(params[name])
        by_tensor[key] = (by_tensor[key][0], by_tensor[key][1] | mask) if key in by_tensor else (name, mask)
    whole = sorted(name for name, mask in by_tensor.values() if mask.all())
    partial = [FrozenRows(name, params[name], mask) for name, mask in by_tensor.values() if not mask.all()]
    return whole, partial


class Freezer:
    """Applies `train.freeze` to a model before its optimizer is built, and keeps the frozen rows still."""

    def __init__(self, cfg: ModelConfig, model: nn.Module, entries: list[str]):
        self.whole, self.partial = frozen_parts(cfg, model, entries)
        for name in self.whole:
            model.get_parameter(name).requires_grad_(False)
        self._decay: dict[int, float] = {}

    @property
    def partial_params(self) -> set[int]:
        """ids of the parameters that have frozen rows: their optimizer group must not decay them."""
        return {id(f.param) for f in self.partial}

    def take_weight_decay(self, groups: list[dict]) -> list[dict]:
        """Optimizer groups with the partly frozen parameters moved to groups of their own without decay; their
        decay is applied by `decay` to the trainable rows."""
        out = []
        for group in groups:
            keep = [p for p in group["params"] if id(p) not in self.partial_params]
            moved = [p for p in group["params"] if id(p) in self.partial_params]
            out.append({**group, "params": keep})
            if moved:
                out.append({**group, "params": moved, "weight_decay": 0.0})
                self._decay.update({id(p): group["weight_decay"] for p in moved})
        return [g for g in out if g["params"]]

    @torch.no_grad()
    def mask_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the frozen rows of the step's gradients (before clipping: the norm is the trainable part's)."""
        sums = {}
        if isinstance(optimizer, MasterWeightAdamW):
            optimizer.gradients()  # folds the last micro-batch into the fp32 sums
            sums = optimizer.grad_sums
        for frozen in self.partial:
            grad = sums.get(frozen.param, frozen.param.grad)
            if grad is not None:
                grad[frozen.rows.to(grad.device)] = 0

    @torch.no_grad()
    def decay(self, optimizer: torch.optim.Optimizer) -> None:
        """Before the step: AdamW's decoupled decay, p *= 1 - lr * wd, on the trainable rows (of the fp32 master
        where the optimizer keeps one)."""
        masters = getattr(optimizer, "masters", {})
        sums = getattr(optimizer, "grad_sums", {})
        for group in optimizer.param_groups:
            for p in group["params"]:
                wd = self._decay.get(id(p), 0.0)
                if wd == 0.0 or sums.get(p, p.grad) is None:  # AdamW skips a parameter without a gradient
                    continue
                frozen = next(f for f in self.partial if f.param is p)
                target = masters.get(p, p)
                trainable = ~frozen.rows.to(target.device)
                target[trainable] *= 1 - float(group["lr"]) * wd
