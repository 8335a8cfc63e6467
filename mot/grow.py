"""Grow a trained model instead of training a bigger one from scratch. Three operations, checkpoint to checkpoint,
each keeping what the model computes on every input the old model understood:

- `grow`: more Pattention parameter tokens (TokenFormer's incremental scaling, mot/model/pattention.py): new
  tokens get zero keys and fresh values, tau keeps the old token count (`model.param_tokens_tau`).
- `upcycle`: a dense checkpoint (untie = []) becomes a MoT one, the dense weights copied into every tower.
- `add_modality`: a new tower initialised from an existing modality's, the unified vocabulary extended by the new
  ids; the special tokens stay at the end of the vocabulary (mot/vocab.py), so their rows move with them.

`grow` and `upcycle` also carry the training state over (AdamW moments mapped like the weights, new entries
zero; schedule, data position, RNG and counters as they were), so `mot train OUT/recipe.toml --resume` continues
the run bit for bit in everything but the model's size. `add_modality` changes the data (a new vocabulary layout
needs new shards), so it writes weights and config only (an empty optimizer state); a run starts from them with
`load_weights_into`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mot import runs
from mot.config import UNTIE_CHOICES, ConfigError, ModalityConfig, RunConfig, config_from_dict, config_to_dict
from mot.interop.run_files import carry_interop_files
from mot.model import MoTTransformer
from mot.model.pattention import TowerPattention
from mot.train import checkpoint as ckpt
from mot.train.freeze import TOWER_MODULES
from mot.vocab import UnifiedVocab

Tensor = torch.Tensor


class GrowError(ConfigError):
    """A grow / upcycle / add-modality request that cannot be carried out; the message says why and what to do."""


@dataclass
class Source:
    """A checkpoint read whole: where it is, its meta and config, weights, optimizer and RNG state."""

    path: Path
    meta: dict[str, Any]
    cfg: RunConfig
    state: dict[str, Tensor]
    optimizer: dict
    rng: dict


def read_source(path: str | Path) -> Source:
    found = runs.resolve_checkpoint(path)
    optimizer, rng, meta = ckpt.load_training_state(found)
    cfg = config_from_dict(meta["config"], where=f"{found}/meta.json")
    return Source(found, meta, cfg, runs.load_model_state(found), optimizer, rng)


# ---------------------------------------------------------------- building the new state


def _fresh_model(cfg: RunConfig, seed: int) -> MoTTransformer:
    """The new architecture freshly initialised (what fills new rows), without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MoTTransformer(cfg.model)


def _tower_params(model: MoTTransformer) -> set[str]:
    return {f"{name}.{p}" for name, module in model.named_modules() if isinstance(module, TOWER_MODULES)
            for p, _ in module.named_parameters(recurse=False)}


def _pattention_tokens(cfg: RunConfig) -> dict[str, list[int]]:
    """Tokens per tower of every Pattention parameter, by name (structure only: built on the meta device)."""
    with torch.device("meta"):
        model = MoTTransformer(cfg.model)
    return {f"{name}.{p}": module.n_tokens for name, module in model.named_modules()
            if isinstance(module, TowerPattention) for p in ("keys", "values")}


def _rebuild(source: Source, fresh: MoTTransformer, weight: Callable[[str, Tensor, Tensor], Tensor],
             moment: Callable[[str, Tensor, Tensor], Tensor] | None) -> tuple[dict[str, Tensor], dict]:
    """Map every weight `weight(name, old, fresh)`, and every AdamW moment `moment(name, old, zeros)` (None: an
    empty optimizer state). Tied parameters stay tied."""
    fresh_state = fresh.state_dict()
    missing = sorted(set(fresh_state) - set(source.state))
    if missing:
        raise GrowError(f"{source.path}: the checkpoint lacks parameters of its own config's model: {missing[:4]}")
    state, by_ptr = {}, {}
    for name, new in fresh_state.items():
        if new.data_ptr() in by_ptr:  # tied embeddings: one tensor under two names
            state[name] = state[by_ptr[new.data_ptr()]]
            continue
        by_ptr[new.data_ptr()] = name
        state[name] = weight(name, source.state[name], new.detach()).contiguous()
        if state[name].shape != new.shape:
            raise GrowError(f"internal: {name} came out {tuple(state[name].shape)}, expected {tuple(new.shape)}")
    if moment is None:
        return state, {}
    optimizer = {"state": {}, "param_groups": source.optimizer["param_groups"]}
    for name, entry in source.optimizer["state"].items():
        optimizer["state"][name] = {
            key: moment(name, value, torch.zeros_like(state[name])) if key.startswith("exp_avg") else value
            for key, value in entry.items()
        }
    return state, optimizer


# ---------------------------------------------------------------- grow


def grown_config(cfg: RunConfig, param_tokens: int, modality: str | None = None) -> RunConfig:
    """The config with `param_tokens` tokens per attention projection (FFN: ffn_token_multiple times that) in
    every modality's tower, or in `modality`'s only, and tau frozen at the counts before growth."""
    m = cfg.model
    names = [mod.name for mod in m.modalities]
    if m.projection != "pattention":
        raise GrowError("the checkpoint's projections are linear (model.projection = 'linear'): only Pattention "
                        "models grow; train one with --model.projection=pattention")
    if modality is not None and modality not in names:
        raise GrowError(f"--modality {modality!r}: no such modality; the checkpoint has {names}")
    old = [m.param_tokens_of("attn", i) for i in range(len(names))]
    picked = [i for i, name in enumerate(names) if modality in (None, name)]
    if modality is not None and len(names) > 1 and not all(c in m.untie for c in ("attn", "ffn")):
        raise GrowError(f"--modality {modality}: its attention and FFN projections are shared with the other "
                        f"modalities (model.untie = {m.untie}); grow all modalities (no --modality), or upcycle "
                        "with those parts untied first")
    smaller = [f"{names[i]} has {old[i]}" for i in picked if old[i] >= param_tokens]
    if smaller:
        raise GrowError(f"--param-tokens {param_tokens} is not more than the tokens already there "
                        f"({', '.join(smaller)}); growing only adds tokens")
    new = [param_tokens if i in picked else n for i, n in enumerate(old)]
    uniform = len(set(new)) == 1
    model = dataclasses.replace(
        m, param_tokens=param_tokens if uniform else m.param_tokens, param_tokens_per_modality=[] if uniform else new,
        param_tokens_tau=[m.tau_tokens_of("attn", i) for i in range(len(names))])
    return _checked(dataclasses.replace(cfg, model=model))


def grow(source: Source, param_tokens: int, modality: str | None = None, seed: int = 0
         ) -> tuple[RunConfig, dict[str, Tensor], dict]:
    """(new config, weights, optimizer state) with more parameter tokens and the same function."""
    cfg = grown_config(source.cfg, param_tokens, modality)
    old_tokens = _pattention_tokens(source.cfg)

    def keep_old_rows(name: str, old: Tensor, new: Tensor, zero_new_keys: bool) -> Tensor:
        if name not in old_tokens:
            return old
        out = new.clone()
        for t, n in enumerate(old_tokens[name]):
            if zero_new_keys and name.endswith(".keys"):
                out[t] = 0  # new keys are zero: they score 0, and GeLU(0) = 0; their values stay freshly drawn
            out[t, :n] = old[t, :n]
        return out

    state, optimizer = _rebuild(source, _fresh_model(cfg, seed), lambda n, o, f: keep_old_rows(n, o, f, True),
                                lambda n, o, z: keep_old_rows(n, o, z, False))
    return cfg, state, optimizer


# ---------------------------------------------------------------- upcycle


def upcycle(source: Source, untie: list[str] | tuple[str, ...] = UNTIE_CHOICES
            ) -> tuple[RunConfig, dict[str, Tensor], dict]:
    """A dense checkpoint as MoT: every untied part starts as a copy of the dense one in each tower (and so do
    its AdamW moments). The function is the dense model's: MoT with identical towers computes what dense does."""
    m = source.cfg.model
    if m.untie and m.n_modalities > 1:
        raise GrowError(f"{source.path} is already MoT (model.untie = {m.untie}); upcycling starts from a dense "
                        "checkpoint (model.untie = [])")
    if m.n_modalities == 1:
        raise GrowError(f"{source.path} has one modality ({m.modalities[0].name}): there are no towers to untie "
                        "into; add a modality first (mot add-modality)")
    untie = list(untie)
    bad = [u for u in untie if u not in UNTIE_CHOICES]
    if bad or not untie:
        raise GrowError(f"--untie {','.join(untie)!r}: choose one or more of {','.join(UNTIE_CHOICES)}")
    cfg = _checked(dataclasses.replace(source.cfg, model=dataclasses.replace(m, untie=untie)))
    fresh = _fresh_model(cfg, 0)
    towers = _tower_params(fresh)

    def copy_into_towers(name: str, old: Tensor, new: Tensor) -> Tensor:
        return old.expand_as(new).clone() if name in towers and old.shape != new.shape else old

    # A weights-only source (an imported model, mot import-hf) has no moments to copy.
    state, optimizer = _rebuild(source, fresh, copy_into_towers, copy_into_towers if source.optimizer else None)
    return cfg, state, optimizer


# ---------------------------------------------------------------- add a modality


def vocab_id_map(old: UnifiedVocab, new: UnifiedVocab) -> tuple[Tensor, Tensor]:
    """(old ids, their new ids) for every id with a meaning: each modality's range and the specials."""
    old_ids = [torch.arange(r.start, r.stop) for r in old.ranges]
    new_ids = [torch.arange(new[r.name].start, new[r.name].stop) for r in old.ranges]
    old_ids.append(torch.arange(old.special_start, old.special_start + old.n_special))
    new_ids.append(torch.arange(new.special_start, new.special_start + new.n_special))
    return torch.cat(old_ids), torch.cat(new_ids)


def add_modality(source: Source, name: str, vocab_size: int, from_modality: str, tokenizer: str = "",
                 seed: int = 0) -> tuple[RunConfig, dict[str, Tensor], dict]:
    """A new modality (last in the vocabulary order, before the specials) whose tower starts as a copy of
    `from_modality`'s; its embedding and head rows are freshly initialised. Returns an empty optimizer state."""
    m = source.cfg.model
    names = [mod.name for mod in m.modalities]
    if name in names:
        raise GrowError(f"--name {name!r}: the checkpoint already has that modality ({names})")
    if from_modality not in names:
        raise GrowError(f"--from {from_modality!r}: no such modality; the checkpoint has {names}")
    if vocab_size <= 0:
        raise GrowError(f"--vocab-size must be positive, got {vocab_size}")
    src = names.index(from_modality)
    template = m.modalities[src]
    modality = ModalityConfig(name, vocab_size, objective=template.objective, loss_weight=template.loss_weight,
                              tokenizer=tokenizer)
    extend = lambda values: values + [values[src]] if values else []
    model = dataclasses.replace(
        m, modalities=[*m.modalities, modality], param_tokens_per_modality=extend(m.param_tokens_per_modality),
        param_tokens_tau=extend(m.param_tokens_tau))
    cfg = _checked(dataclasses.replace(source.cfg, model=model))
    fresh = _fresh_model(cfg, seed)
    towers = _tower_params(fresh)
    old_ids, new_ids = vocab_id_map(UnifiedVocab(m), fresh.vocab)

    def place(param: str, old: Tensor, new: Tensor) -> Tensor:
        if param in ("embed.weight", "head.weight"):
            out = new.clone()  # the new modality's rows and the padding: fresh
            out[new_ids] = old[old_ids]
            return out
        if param in towers and old.shape[0] == m.n_modalities and new.shape[0] == m.n_modalities + 1:
            return torch.cat([old, old[src : src + 1]])
        return old

    state, _ = _rebuild(source, fresh, place, None)
    return cfg, state, {}


# ---------------------------------------------------------------- writing and loading


def _checked(cfg: RunConfig) -> RunConfig:
    """Validate a derived config exactly as a recipe is validated."""
    try:
        return config_from_dict(config_to_dict(cfg), "the derived config")
    except ConfigError as err:
        raise GrowError(str(err)) from None


def recipe_toml(cfg: RunConfig) -> str:
    """The config as a TOML recipe (JSON scalars, strings and flat lists are valid TOML values)."""
    data = config_to_dict(cfg)
    lines = [f"name = {json.dumps(data['name'])}"]
    for table in ("train", "data"):
        lines += ["", f"[{table}]", *(f"{k} = {json.dumps(v)}" for k, v in data[table].items())]
    lines += ["", "[model]", *(f"{k} = {json.dumps(v)}" for k, v in data["model"].items() if k != "modalities")]
    for mod in data["model"]["modalities"]:
        lines += ["", "[[model.modalities]]", *(f"{k} = {json.dumps(v)}" for k, v in mod.items())]
    return "\n".join(lines) + "\n"


TRAINING_STATE = ("tokens_seen", "wall_s", "skipped_steps", "flops_seen", "scheduler", "loader", "python_rng")


def write_derived(out: str | Path, source: Source, cfg: RunConfig, state: dict[str, Tensor], optimizer: dict,
                  operation: str, details: dict[str, Any]) -> Path:
    """Write OUT as a run folder: OUT/checkpoints/step-N (N = the source's step), OUT/recipe.toml whose run
    folder is OUT itself (so `mot train OUT/recipe.toml --resume` continues there), OUT/config.json and the
    source run's tokenizers. A non-empty optimizer state carries the source's training state along."""
    out = Path(out)
    if runs.list_checkpoints(out / "checkpoints"):
        raise GrowError(f"--out {out}: already holds checkpoints; choose a new folder")
    cfg = dataclasses.replace(cfg, name=out.name,
                              train=dataclasses.replace(cfg.train, out_dir=str(out.parent)))
    resumable = bool(optimizer)
    keep = TRAINING_STATE if resumable else ("tokens_seen", "flops_seen")
    meta = {k: source.meta[k] for k in keep if k in source.meta}
    meta.update(config=config_to_dict(cfg), tokenizers=source.meta.get("tokenizers", ""),
                derived_from=str(source.path), operation=operation, source_step=source.meta["step"],
                weights_only=not resumable, **details)
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(source.rng["torch"])  # rng.pt as the source left it: resuming continues its stream
        path = ckpt.save_checkpoint(out / "checkpoints", source.meta["step"], state, optimizer, meta, keep=1)
    (out / "recipe.toml").write_text(recipe_toml(cfg))
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    tokenizers = source.path.parent.parent / "tokenizers"
    if tokenizers.is_dir() and not (out / "tokenizers").exists():
        shutil.copytree(tokenizers, out / "tokenizers")
    carry_interop_files(source.path.parent.parent, out)
    return path


# Fields that do not change the weights or the function: a run may change them when it starts from a checkpoint.
FREE_MODEL_KEYS = ("max_seq_len",)
FREE_MODALITY_KEYS = ("loss_weight", "token_fraction", "tokenizer", "objective")


def _function_fields(model: dict) -> dict:
    kept = {k: v for k, v in model.items() if k not in FREE_MODEL_KEYS}
    kept["modalities"] = [{k: v for k, v in mod.items() if k not in FREE_MODALITY_KEYS} for mod in model["modalities"]]
    return kept


def load_weights_into(model: MoTTransformer, path: str | Path, where: str = "--init-from") -> dict[str, Any]:
    """Load a checkpoint's weights (only) into `model`, whose config must describe the same architecture: the
    start of a new run from a grown, upcycled or extended checkpoint (fresh optimizer, schedule and data order).
    Returns the checkpoint's meta."""
    found = runs.resolve_checkpoint(path)
    meta = runs.read_meta(found)
    saved, wanted = _function_fields(meta["config"]["model"]), _function_fields(dataclasses.asdict(model.cfg))
    diff = [f"{k}: {saved.get(k)!r} (checkpoint) vs {wanted.get(k)!r}" for k in sorted(set(saved) | set(wanted))
            if saved.get(k) != wanted.get(k)]
    if diff:
        raise GrowError(f"{where}: {found} holds another model than the recipe's ({'; '.join(diff)}); use its "
                        f"recipe ({found.parent.parent / 'recipe.toml'} for mot grow/upcycle/add-modality output)")
    runs.load_weights(model, found)
    return meta
