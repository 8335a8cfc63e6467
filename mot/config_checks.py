"""What a recipe may not combine: the checks a `RunConfig` passes after every key has its type.

Each failure goes to `fail(key, why)`, which raises with the recipe's name (mot/config.py).
"""

from __future__ import annotations

import typing
from collections.abc import Callable

from mot.config_schema import UNTIE_CHOICES, ModalityConfig, ModelConfig, RunConfig

Fail = Callable[[str, str], typing.NoReturn]


def check_run_config(cfg: RunConfig, fail: Fail) -> None:
    """Every check of the model, train and data tables; the first failure goes to `fail`."""
    m = cfg.model
    for key in ("dim", "n_layers", "n_heads", "ffn_multiple_of", "vocab_multiple_of", "max_seq_len"):
        if getattr(m, key) <= 0:
            fail(f"model.{key}", f"must be positive, got {getattr(m, key)}")
    if m.dim % m.n_heads:
        fail("model.n_heads", f"must divide model.dim={m.dim}, got {m.n_heads}")
    if m.head_dim % 2:
        fail("model.n_heads", f"gives an odd head_dim {m.head_dim}; rotary embeddings need it even")
    if m.n_kv_heads < 0 or m.n_heads % m.kv_heads:
        fail("model.n_kv_heads", f"must divide model.n_heads={m.n_heads} (0 = n_heads), got {m.n_kv_heads}")
    if m.kv_heads != m.n_heads and m.projection == "pattention":
        fail("model.n_kv_heads", "grouped-query attention is for linear projections; Pattention keeps n_heads")
    if m.ffn_dim < 0:
        fail("model.ffn_dim", f"must be >= 0, got {m.ffn_dim}")
    if not m.modalities:
        fail("model.modalities", "needs at least one modality")
    names = [mod.name for mod in m.modalities]
    if len(set(names)) != len(names):
        fail("model.modalities", f"has duplicate names {names}")
    for i, mod in enumerate(m.modalities):
        if mod.vocab_size <= 0:
            fail(f"model.modalities.{i}.vocab_size", f"must be positive, got {mod.vocab_size}")
        if mod.loss_weight < 0:
            fail(f"model.modalities.{i}.loss_weight", f"must be >= 0, got {mod.loss_weight}")
        _check_diffusion(mod, f"model.modalities.{i}", fail)
    if m.special_modality and m.special_modality not in names:
        fail("model.special_modality", f"names no modality: {m.special_modality!r} not in {names}")
    special = m.special_modality or names[0]
    if any(mod.is_diffusion and mod.name == special for mod in m.modalities):
        fail("model.special_modality", f"is the diffusion modality {special!r}; special tokens (<boi>, <eoi>, ...) "
                                       "need an 'ar' tower: put an 'ar' modality first or name one here")
    if m.n_special_tokens < 0:
        fail("model.n_special_tokens", f"must be >= 0, got {m.n_special_tokens}")
    bad = [u for u in m.untie if u not in UNTIE_CHOICES]
    if bad:
        fail("model.untie", f"has unknown parts {bad}; choose from {list(UNTIE_CHOICES)}")
    if len(set(m.untie)) != len(m.untie):
        fail("model.untie", f"repeats a part: {m.untie}")
    _check_pattention(m, fail)
    t = cfg.train
    for key in ("seq_len", "batch_size", "steps"):
        if getattr(t, key) <= 0:
            fail(f"train.{key}", f"must be positive, got {getattr(t, key)}")
    if t.seq_len > m.max_seq_len:
        fail("train.seq_len", f"({t.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    for key in ("micro_batch_size", "warmup_steps", "log_every", "eval_every", "eval_batches",
                "checkpoint_every", "max_skipped_steps"):
        if getattr(t, key) < 0:
            fail(f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    if t.final_eval_batches < 0:
        fail("train.final_eval_batches", f"must be >= 0 (0 = no final evaluation), got {t.final_eval_batches}")
    if 0 < t.final_eval_batches <= t.eval_batches:
        fail("train.final_eval_batches", f"({t.final_eval_batches}) must exceed train.eval_batches "
                                         f"({t.eval_batches}): it is the larger final evaluation (0 = none)")
    if t.micro_batch_size and t.batch_size % t.micro_batch_size:
        fail("train.micro_batch_size", f"({t.micro_batch_size}) must divide train.batch_size ({t.batch_size})")
    if t.lr <= 0:
        fail("train.lr", f"must be positive, got {t.lr}")
    if t.eps <= 0:
        fail("train.eps", f"must be positive, got {t.eps}")
    for entry in t.freeze:
        kind, colon, name = entry.partition(":")
        if colon and kind in ("tower", "embed") and name not in names:
            fail("train.freeze", f"entry {entry!r} names no modality; have {names}")
    if not 0 <= t.min_lr_ratio <= 1:
        fail("train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    if t.warmup_steps > t.steps:
        fail("train.warmup_steps", f"({t.warmup_steps}) exceeds train.steps ({t.steps})")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(t, key) < 1:
            fail(f"train.{key}", f"must be in [0, 1), got {getattr(t, key)}")
    for key in ("weight_decay", "grad_clip", "eps", "peak_tflops"):
        if getattr(t, key) < 0:
            fail(f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    if t.master_weights is True and t.precision == "fp32":
        fail("train.master_weights", "needs bf16 precision (train.precision is 'fp32')")
    if t.cuda_graph:
        if not t.compile:
            fail("train.cuda_graph", "needs train.compile = true (eager blocks read values back to the host, "
                                     "which a CUDA graph cannot capture)")
        if t.activation_checkpointing:
            fail("train.cuda_graph", "is not combined with train.activation_checkpointing")
        diffusion = [mod.name for mod in m.modalities if mod.is_diffusion]
        if diffusion:
            fail("train.cuda_graph", f"needs fixed shapes; diffusion modalities {diffusion} vary the number of "
                                     "latent tokens per batch")
    if t.check_routing and any(mod.is_diffusion for mod in m.modalities):
        fail("train.check_routing", "checks autoregressive batches only (latent rows carry no token ids)")
    if t.keep_checkpoints < 1:
        fail("train.keep_checkpoints", f"must be at least 1, got {t.keep_checkpoints}")
    d = cfg.data
    if not 0 <= d.eval_fraction < 1:
        fail("data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
    if t.final_eval_batches and not d.eval_fraction:
        fail("train.final_eval_batches", f"({t.final_eval_batches}) needs a held-out set: data.eval_fraction is 0")
    if not 0 <= d.condition_dropout <= 1:
        fail("data.condition_dropout", f"must be in [0, 1], got {d.condition_dropout}")
    if d.prepare_workers < 0:
        fail("data.prepare_workers", f"must be >= 0, got {d.prepare_workers}")
    if d.demo and not d.documents:
        fail("data.demo", "needs data.documents: the path the demo corpus is generated at")


def _check_diffusion(mod: ModalityConfig, key: str, fail: Fail) -> None:
    latent_keys = ("latent_channels", "latent_grid")
    if not mod.is_diffusion:
        set_keys = [k for k in latent_keys if getattr(mod, k)] + (["patch_size"] if mod.patch_size != 1 else [])
        if set_keys:
            fail(f"{key}.{set_keys[0]}", f"only applies with objective = 'diffusion' (modality {mod.name!r} is "
                                         f"{mod.objective!r})")
        return
    for k in latent_keys:
        if getattr(mod, k) <= 0:
            fail(f"{key}.{k}", f"must be positive for the diffusion modality {mod.name!r} (the VQGAN's "
                               f"{'embed_dim' if k == 'latent_channels' else 'grid side'}), got {getattr(mod, k)}")
    if mod.patch_size <= 0 or mod.latent_grid % mod.patch_size:
        fail(f"{key}.patch_size", f"must be positive and divide latent_grid ({mod.latent_grid}), got {mod.patch_size}")


def _check_pattention(m: ModelConfig, fail: Fail) -> None:
    lists = ("param_tokens_per_modality", "param_tokens_tau")
    if m.projection == "linear":
        set_keys = [k for k in ("param_tokens", *lists) if getattr(m, k)]
        set_keys += ["ffn_token_multiple"] if m.ffn_token_multiple != 4 else []
        if set_keys:
            fail(f"model.{set_keys[0]}", "only applies with model.projection = 'pattention' (it is 'linear')")
        return
    if m.param_tokens < 0:
        fail("model.param_tokens", f"must be >= 0 (0 = model.dim), got {m.param_tokens}")
    if m.ffn_token_multiple < 1:
        fail("model.ffn_token_multiple", f"must be at least 1, got {m.ffn_token_multiple}")
    names = [mod.name for mod in m.modalities]
    shared = [c for c in ("attn", "ffn") if m.towers(c) == 1]
    for key in lists:
        values = getattr(m, key)
        if not values:
            continue
        if len(values) != len(names):
            fail(f"model.{key}", f"needs one count per modality {names}, got {values}")
        bad = [i for i, v in enumerate(values) if v <= 0]
        if bad:
            fail(f"model.{key}.{bad[0]}", f"must be positive, got {values[bad[0]]}")
        if len(set(values)) > 1 and shared:
            fail(f"model.{key}", f"differs between modalities ({values}), but the {shared} projections are shared "
                 f"by all of them (model.untie = {m.untie}); untie them or give one count")
