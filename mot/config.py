"""Typed run configuration: dataclasses, TOML recipes, command-line overrides.

A recipe is a TOML file whose tables mirror the dataclasses below. Every key is
checked before any work starts: an unknown key, a value of the wrong type or an
inconsistent combination fails with an error naming the file and the key.

    cfg = load_config("recipes/demo.toml", ["--model.dim=256", "--model.untie=[]"])
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

UNTIE_CHOICES = ("attn", "ffn", "norm")


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the source and the key."""


@dataclass
class ModalityConfig:
    """One modality: a contiguous id range of the unified vocabulary and its own tower."""

    name: str
    vocab_size: int  # ids this modality owns (BPE size, VQGAN codebook size, speech units)
    objective: Literal["ar", "diffusion"] = "ar"
    loss_weight: float = 1.0
    # Expected share of tokens in the data; used for mixed active-params / FLOPs figures only.
    token_fraction: float = 0.0
    tokenizer: str = ""  # tokenizer recipe or checkpoint; read by data and generation, not the model
    # objective = "diffusion" (Transfusion setting): an image span holds the VQGAN's continuous latent grid
    # (the codebook vectors of its codes, normalised), patchified, instead of one token per code.
    latent_channels: int = 0  # the VQGAN's embed_dim
    latent_grid: int = 0  # the VQGAN's grid side h = w (codes per image = latent_grid ** 2)
    patch_size: int = 1  # latent cells per side of one token: (latent_grid / patch_size) ** 2 tokens per image
    schedule: Literal["ddpm_cosine", "flow"] = "ddpm_cosine"  # eps-prediction DDPM, or rectified-flow velocity

    @property
    def is_diffusion(self) -> bool:
        return self.objective == "diffusion"

    @property
    def patch_dim(self) -> int:
        """Size of one latent token: latent_channels * patch_size ** 2."""
        return self.latent_channels * self.patch_size**2

    @property
    def latent_tokens(self) -> int:
        """Tokens of one image span under diffusion."""
        return (self.latent_grid // self.patch_size) ** 2


@dataclass
class ModelConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # key/value heads, each shared by n_heads / n_kv_heads query heads (GQA); 0 = n_heads
    ffn_dim: int = 0  # SwiGLU hidden size; 0 = 8/3 * dim rounded up to ffn_multiple_of (Llama's rule)
    ffn_multiple_of: int = 256
    modalities: list[ModalityConfig] = field(
        default_factory=lambda: [ModalityConfig("text", 256), ModalityConfig("image", 256)]
    )
    n_special_tokens: int = 8  # begin/end of document, image, speech, pad, reserved
    special_modality: str = ""  # tower that special tokens go through; "" = the first modality
    vocab_multiple_of: int = 64  # pad the unified vocabulary for matmul-friendly head shapes
    # Which non-embedding parameters exist once per modality. [] is the dense baseline.
    untie: list[str] = field(default_factory=lambda: list(UNTIE_CHOICES))
    qk_norm: bool = False  # normalise queries and keys per head (per modality when norms are untied)
    # "rms": RMSNorm with one gain shared by the heads. "layernorm_per_head": LayerNorm with a gain and a bias for
    # every head (Chameleon's; eps fixed at 1e-5 as in its code).
    qk_norm_type: Literal["rms", "layernorm_per_head"] = "rms"
    # "pre": x + f(norm(x)). "chameleon": x + norm(f(x)), the norm inside the residual on the output.
    norm_placement: Literal["pre", "chameleon"] = "pre"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    init_std: float = 0.02
    tie_embeddings: bool = False
    # TokenFormer (arXiv 2410.23168): "pattention" turns every tower projection into token-parameter attention
    # (mot/model/pattention.py) so that a trained model grows by appending parameter tokens (`mot grow`).
    projection: Literal["linear", "pattention"] = "linear"
    param_tokens: int = 0  # parameter tokens of the QKV and of the output projection per tower; 0 = dim
    param_tokens_per_modality: list[int] = field(default_factory=list)  # [] = param_tokens for every modality
    ffn_token_multiple: int = 4  # the FFN (one Pattention) holds this many times the tokens (TokenFormer: 4)
    # n of the scale tau = sqrt(n) in Pattention's modified softmax, per modality; [] = the modality's own
    # token count (TokenFormer). `mot grow` writes the counts before growth here: the function stays the same.
    param_tokens_tau: list[int] = field(default_factory=list)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of the keys (and of the values): kv_heads * head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def ffn_hidden(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        hidden = int(8 * self.dim / 3)
        return self.ffn_multiple_of * -(-hidden // self.ffn_multiple_of)

    @property
    def n_modalities(self) -> int:
        return len(self.modalities)

    def towers(self, component: str) -> int:
        """How many copies of a component ("attn", "ffn", "norm") the model holds."""
        return self.n_modalities if component in self.untie else 1

    @property
    def is_dense(self) -> bool:
        return not self.untie or self.n_modalities == 1

    def param_tokens_of(self, component: str, modality: int = 0) -> int:
        """Parameter tokens of a Pattention projection of "attn" (QKV and output) or "ffn", in one tower."""
        base = self.param_tokens_per_modality[modality] if self.param_tokens_per_modality else self.param_tokens
        return (base or self.dim) * (self.ffn_token_multiple if component == "ffn" else 1)

    def tau_tokens_of(self, component: str, modality: int = 0) -> int:
        """The n of tau = sqrt(n) in that projection's modified softmax."""
        if not self.param_tokens_tau:
            return self.param_tokens_of(component, modality)
        return self.param_tokens_tau[modality] * (self.ffn_token_multiple if component == "ffn" else 1)


@dataclass
class DataConfig:
    """Where the training tokens come from. Relative paths are taken from the working directory."""

    shards: str = ""  # a folder written by `mot prepare`
    # When `shards` holds no prepared corpus yet, the trainer prepares it from these first.
    documents: str = ""  # JSONL documents (or a local HF datasets source)
    tokenizers: str = ""  # folder with text/ image/ speech/ tokenizers; copied into the run for generation
    demo: bool = False  # generate the bundled demo corpus at `documents` if it is missing
    prepare_workers: int = 2
    eval_fraction: float = 0.02  # documents held out for evaluation (chosen by a hash of their id)
    positions: Literal["continue", "restart"] = "continue"  # rotary positions of a document split over sequences
    # Probability of removing a training document's leading caption before its first image or speech span,
    # so that the model also learns images and speech without a condition (classifier-free guidance).
    condition_dropout: float = 0.0


@dataclass
class TrainConfig:
    seq_len: int = 512
    batch_size: int = 8  # sequences per optimizer step, over all devices and accumulation steps
    micro_batch_size: int = 0  # sequences per device per forward pass; 0 = batch_size / devices
    steps: int = 1000
    seed: int = 0
    # AdamW; weight decay applies to projection and head matrices, not to norms or embeddings.
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a GPU, fp32 on the CPU
    compile: bool = False
    # On CUDA, document masks as FlexAttention block masks (masked tiles skipped) or dense boolean SDPA masks.
    # "auto": FlexAttention when the blocks are compiled (the kernel is then fused into the block's graph);
    # eager blocks call it through its own compiled wrapper per layer, which loses at small sizes (bench/NOTES.md,
    # "Figures moved out of code comments").
    flex_attention: bool | Literal["auto"] = "auto"
    activation_checkpointing: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"  # used when launched on several processes
    # FSDP: keep each block's gathered bf16 weights from the first forward of a step to its last backward (one
    # all-gather per step instead of two per micro-batch; costs 2 bytes per parameter per GPU). mot/train/sharding.py
    fsdp_keep_gathered: bool = False
    # bf16 matmul weights in the model, their fp32 masters in the optimizer (mot/train/master_weights.py): no
    # weight casts per micro-batch, gradients still accumulated in fp32. One process with bf16 precision only.
    # "auto": on for bf16 training on one CUDA device.
    master_weights: bool | Literal["auto"] = "auto"
    # A non-finite loss or gradient: "stop" names the step and modality; "skip" drops that update.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10  # "skip" still stops after this many skipped updates in a row
    # Output, logging, evaluation, checkpoints.
    out_dir: str = "runs"  # the run writes into out_dir/name
    log_every: int = 10
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 4  # global batches (train.batch_size sequences each) per evaluation
    checkpoint_every: int = 100  # 0 = only at the end
    keep_checkpoints: int = 3
    tensorboard: bool = True
    peak_tflops: float = 0.0  # per-device dense bf16 peak for MFU; 0 = look up the GPU, none on CPU
    # Parts that training leaves bit for bit as they are (mot/train/freeze.py): "tower:NAME" (a modality's own
    # towers), "embed:NAME" (its embedding and head rows), or parameter-name patterns ("blocks.0.*").
    freeze: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


# ---------------------------------------------------------------- validation


def _check_semantics(cfg: RunConfig, where: str) -> None:
    m = cfg.model

    def fail(key: str, why: str) -> typing.NoReturn:
        raise ConfigError(f"{where}: '{key}' {why}")

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
    if t.keep_checkpoints < 1:
        fail("train.keep_checkpoints", f"must be at least 1, got {t.keep_checkpoints}")
    d = cfg.data
    if not 0 <= d.eval_fraction < 1:
        fail("data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
    if not 0 <= d.condition_dropout <= 1:
        fail("data.condition_dropout", f"must be in [0, 1], got {d.condition_dropout}")
    if d.prepare_workers < 0:
        fail("data.prepare_workers", f"must be >= 0, got {d.prepare_workers}")
    if d.demo and not d.documents:
        fail("data.demo", "needs data.documents: the path the demo corpus is generated at")


def _check_diffusion(mod: ModalityConfig, key: str, fail: Callable[[str, str], typing.NoReturn]) -> None:
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


def _check_pattention(m: ModelConfig, fail: Callable[[str, str], typing.NoReturn]) -> None:
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


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (nested dataclasses built)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a table, got {type(value).__name__}")
        return _build(tp, value, key, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}.{i}", where) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is type(None) and value is None:
        return None
    # bool is a subclass of int: reject True where an int is wanted, and 1 where a bool is.
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(
            f"{where}: '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    return value


def _build(cls: type, data: dict, prefix: str, where: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {sorted(fields)}"
            raise ConfigError(f"{where}: unknown key '{full}'{hint}")
        kwargs[key] = _coerce(value, hints[key], full, where)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        full = [f"{prefix}.{m}" if prefix else m for m in missing]
        raise ConfigError(f"{where}: missing required key(s) {full}")
    return cls(**kwargs)


def config_from_dict(data: dict, where: str = "<dict>") -> RunConfig:
    cfg = _build(RunConfig, data, "", where)
    _check_semantics(cfg, where)
    return cfg


# ---------------------------------------------------------------- overrides


def _parse_value(text: str) -> Any:
    """A TOML literal (`512`, `1e-4`, `true`, `["ffn"]`, `"x"`), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict, override: str) -> None:
    """Apply `--model.dim=512` (or `model.dim=512`) to the raw recipe dict in place."""
    text = override.removeprefix("--")
    if "=" not in text:
        raise ConfigError(f"override {override!r}: expected --key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {override!r}: no list entry {'.'.join(parts[: i + 1])}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {override!r}: no list entry {dotted}")
        node[int(last)] = _parse_value(raw)
    else:
        node[last] = _parse_value(raw)


def _read_toml(path: str | Path, overrides: list[str] | tuple[str, ...], kind: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {kind} file not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    for override in overrides:
        apply_override(data, override)
    return data


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML recipe, apply `--key=value` overrides, validate everything."""
    data = _read_toml(path, overrides, "recipe")
    where = str(path) + (f" (with overrides {list(overrides)})" if overrides else "")
    return config_from_dict(data, where)


def load_dataclass(cls: type, path: str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """Any dataclass config (tokenizer configs, ...) from a TOML file, checked like a recipe."""
    return _build(cls, _read_toml(path, overrides, "config"), "", str(path))


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
