"""Hugging Face Chameleon checkpoints <-> mot run folders.

    import_hf("chameleon-7b/", "runs/chameleon")   # config.json + *.safetensors (+ tokenizer.json) -> a run folder
    export_hf("runs/chameleon", "out/hf")          # a dense run -> a folder ChameleonForConditionalGeneration loads

Chameleon is mot's dense baseline with options: per-head LayerNorm q/k norms with bias
(`qk_norm_type = "layernorm_per_head"`), the 30B model's norm placement (`swin_norm`, mot's
`norm_placement = "chameleon"`), grouped-query attention (`n_kv_heads`) and untied embeddings. The
fused QKV and gate/up projections are the concatenations of Chameleon's q/k/v and gate/up weights. Rows of
the embedding and the head are permuted between the two vocabularies (chameleon_vocab.py); mot ids with
no Chameleon counterpart get zero rows.

Only safetensors and JSON are read: transformers is not needed here (the tests use it as the reference).
The VQVAE's tensors are kept as they are in the run folder (`chameleon_vqvae.safetensors`) and written back
on export; its encoder and quantizer also become the run's image tokenizer (tokenizers/image, taming format,
without a decoder: transformers ships none).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mot import runs
from mot.config import (
    ConfigError,
    ModalityConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
)
from mot.interop.chameleon_vocab import ChameleonVocab, identity_vocab
from mot.interop.run_files import VOCAB_FILE, VQVAE_FILE
from mot.tokenize.base import TokenizerError
from mot.tokenize.image import ImageTokenizer, VQGANConfig
from mot.tokenize.text import ID_MAP_FILE
from mot.train import checkpoint as ckpt
from mot.vocab import UnifiedVocab

VQVAE_PREFIX = "model.vqmodel."
Tensor = torch.Tensor


class ChameleonImportError(ConfigError):
    """A Chameleon folder or a run that cannot be converted; the message names what is wrong."""


def read_hf_folder(folder: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(config.json as a dict, every tensor of the folder's *.safetensors files)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ChameleonImportError(f"{folder}: no config.json (expected a Hugging Face Chameleon folder)")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "chameleon":
        raise ChameleonImportError(f"{config_path}: model_type is {config.get('model_type')!r}, not 'chameleon'")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ChameleonImportError(f"{folder}: no *.safetensors files (pickled .bin checkpoints are not read)")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    return config, state


def _require(config: dict, key: str, ok, expected: str) -> None:
    if key in config and not ok(config[key]):
        raise ChameleonImportError(f"config.json: {key} = {config[key]!r} is not supported (mot computes {expected})")


def model_config_from_hf(config: dict, vocab: ChameleonVocab) -> ModelConfig:
    """The dense mot model that computes what Chameleon computes; unsupported options fail by name."""
    _require(config, "hidden_act", lambda v: v == "silu", "SwiGLU with silu")
    _require(config, "attention_bias", lambda v: not v, "projections without bias")
    _require(config, "mlp_bias", lambda v: not v, "projections without bias")
    _require(config, "rope_scaling", lambda v: not v, "rotary embeddings without scaling")
    rope = config.get("rope_parameters") or {}
    _require(rope, "rope_type", lambda v: v == "default", "the default rotary embedding")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    return ModelConfig(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=0 if kv_heads == heads else kv_heads,
        ffn_dim=config["intermediate_size"],
        modalities=[ModalityConfig("text", len(vocab.text_ids), tokenizer=""),
                    ModalityConfig("image", len(vocab.image_ids), tokenizer="")],
        untie=[],
        qk_norm=True,
        qk_norm_type="layernorm_per_head",
        norm_placement="chameleon" if config.get("swin_norm") else "pre",
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        max_seq_len=config.get("max_position_embeddings", 4096),
        init_std=config.get("initializer_range", 0.02),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def image_tokenizer_from_hf(config: dict, hf: dict[str, Tensor]) -> ImageTokenizer:
    """Chameleon's VQVAE (encoder, quantizer) as mot's taming-format image tokenizer, without a decoder.

    transformers names the VQVAE's modules as taming does (encoder.down.0.block.0.norm1, quantize.embedding,
    quant_conv), so the tensors load under `model.vqmodel.` stripped."""
    vq = config.get("vq_config") or {}
    if vq.get("attn_type", "vanilla") != "vanilla":
        raise ChameleonImportError(f"vq_config.attn_type = {vq['attn_type']!r}: taming's encoder has vanilla attention")
    vqgan = VQGANConfig(
        resolution=vq.get("resolution", 512), in_channels=vq.get("in_channels", 3), ch=vq.get("base_channels", 128),
        ch_mult=list(vq.get("channel_multiplier", [1, 1, 2, 2, 4])), num_res_blocks=vq.get("num_res_blocks", 2),
        attn_resolutions=list(vq.get("attn_resolutions") or []), z_channels=vq.get("latent_channels", 256),
        double_z=vq.get("double_latent", False), dropout=vq.get("dropout", 0.0),
        n_embed=vq.get("num_embeddings", 8192), embed_dim=vq.get("embed_dim", 256), has_decoder=False)
    try:
        tokenizer = ImageTokenizer(vqgan)
    except TokenizerError as err:
        raise ChameleonImportError(f"config.json vq_config: {err}") from None
    state = {k[len(VQVAE_PREFIX):]: v.float() for k, v in hf.items() if k.startswith(VQVAE_PREFIX)}
    tokenizer.load_weights(state, Path("config.json vq_config"))
    return tokenizer.eval()


def with_taming_decoder(vqvae: dict[str, Tensor], ckpt_path: Path, yaml_path: Path) -> ImageTokenizer:
    """The taming checkpoint of the same VQGAN (Chameleon's release ships one), which has the decoder; its
    encoder and codebook must equal the VQVAE's tensors (`model.vqmodel.*`), compared in the VQVAE's dtype."""
    full = ImageTokenizer.from_taming(ckpt_path, yaml_path)
    theirs = full.state_dict()
    for key, tensor in vqvae.items():
        name = key[len(VQVAE_PREFIX):]
        if name not in theirs or theirs[name].shape != tensor.shape or not torch.equal(
                theirs[name].to(tensor.dtype), tensor):
            raise ChameleonImportError(f"{ckpt_path}: not the VQGAN of this Chameleon checkpoint ({name} differs "
                                       "from the VQVAE's)")
    return full


def _check_exportable(cfg: ModelConfig) -> None:
    names = [m.name for m in cfg.modalities]
    problems = []
    if not cfg.is_dense:
        problems.append(f"untie = {cfg.untie} (Chameleon is dense: upcycled MoT runs have no Chameleon form)")
    if names != ["text", "image"] or any(m.is_diffusion for m in cfg.modalities):
        problems.append(f"modalities {names} (Chameleon has text and image codes, autoregressive)")
    if cfg.projection != "linear":
        problems.append("projection = 'pattention'")
    if not cfg.qk_norm or cfg.qk_norm_type != "layernorm_per_head":
        problems.append("q/k norms other than qk_norm_type = 'layernorm_per_head' (Chameleon always has them)")
    if problems:
        raise ChameleonImportError("cannot export to Chameleon: " + "; ".join(problems))


def hf_config_from_model(cfg: ModelConfig, vocab: ChameleonVocab, base: dict | None = None) -> dict:
    """config.json for `cfg`: `base` (the imported folder's config) with the model's sizes written over it."""
    out = dict(base or {"model_type": "chameleon", "architectures": ["ChameleonForConditionalGeneration"],
                        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False})
    named = {"<pad>": "pad_token_id", "<bod>": "bos_token_id", "<eod>": "eos_token_id"}
    if base is None:
        out.update({key: vocab.special_ids[name] for name, key in named.items() if name in vocab.special_ids})
    out.update(
        vocab_size=vocab.hf_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len, initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings, swin_norm=cfg.norm_placement == "chameleon",
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    if base is None or "vocabulary_map" not in base:
        out["vocabulary_map"] = vocab.vocabulary_map()
    return out


def _layer_names(i: int) -> dict[str, str]:
    hf, ours = f"model.layers.{i}.", f"blocks.{i}."
    return {
        "q": hf + "self_attn.q_proj.weight", "k": hf + "self_attn.k_proj.weight", "v": hf + "self_attn.v_proj.weight",
        "o": hf + "self_attn.o_proj.weight", "gate": hf + "mlp.gate_proj.weight", "up": hf + "mlp.up_proj.weight",
        "down": hf + "mlp.down_proj.weight", "input_norm": hf + "input_layernorm.weight",
        "post_norm": hf + "post_attention_layernorm.weight",
        "q_norm.weight": hf + "self_attn.q_norm.weight", "q_norm.bias": hf + "self_attn.q_norm.bias",
        "k_norm.weight": hf + "self_attn.k_norm.weight", "k_norm.bias": hf + "self_attn.k_norm.bias",
        "qkv": ours + "attn.qkv.weight", "out": ours + "attn.out.weight", "w13": ours + "ffn.w13.weight",
        "w2": ours + "ffn.w2.weight", "attn_norm": ours + "attn_norm.weight", "ffn_norm": ours + "ffn_norm.weight",
    }


def state_from_hf(hf: dict[str, Tensor], cfg: ModelConfig, table: Tensor) -> dict[str, Tensor]:
    """mot's state dict (one tower) from Chameleon's tensors; `table` = mot id -> Chameleon id or -1."""

    def rows(matrix: Tensor) -> Tensor:
        out = matrix.new_zeros(len(table), matrix.shape[1])
        mapped = (table >= 0).nonzero().squeeze(1)
        out[mapped] = matrix[table[mapped]]
        return out

    def get(name: str) -> Tensor:
        if name not in hf:
            raise ChameleonImportError(f"the checkpoint lacks {name} (a Chameleon model of {cfg.n_layers} layers)")
        return hf[name]

    state = {"embed.weight": rows(get("model.embed_tokens.weight")),
             "final_norm.weight": get("model.norm.weight")[None]}
    state["head.weight"] = state["embed.weight"] if cfg.tie_embeddings else rows(get("lm_head.weight"))
    for i in range(cfg.n_layers):
        n, ours = _layer_names(i), f"blocks.{i}.attn."
        state[n["qkv"]] = torch.cat([get(n["q"]), get(n["k"]), get(n["v"])])[None]
        state[n["out"]] = get(n["o"])[None]
        state[n["w13"]] = torch.cat([get(n["gate"]), get(n["up"])])[None]
        state[n["w2"]] = get(n["down"])[None]
        # Chameleon's input_layernorm / post_attention_layernorm sit before or (swin_norm) after each sub-layer,
        # as mot's attn_norm / ffn_norm do under norm_placement "pre" / "chameleon".
        state[n["attn_norm"]], state[n["ffn_norm"]] = get(n["input_norm"])[None], get(n["post_norm"])[None]
        for part in ("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"):
            state[ours + part] = get(n[part])[None]
    return state


def state_to_hf(state: dict[str, Tensor], cfg: ModelConfig, table: Tensor, hf_size: int) -> dict[str, Tensor]:
    """Chameleon's tensors (without the VQVAE) from mot's state dict of a dense model."""

    def rows(matrix: Tensor) -> Tensor:
        out = matrix.new_zeros(hf_size, matrix.shape[1])
        mapped = (table >= 0).nonzero().squeeze(1)
        out[table[mapped]] = matrix[mapped]
        return out

    hf = {"model.embed_tokens.weight": rows(state["embed.weight"]), "model.norm.weight": state["final_norm.weight"][0],
          "lm_head.weight": rows(state["head.weight"])}
    for i in range(cfg.n_layers):
        n, ours = _layer_names(i), f"blocks.{i}.attn."
        hf[n["q"]], hf[n["k"]], hf[n["v"]] = state[n["qkv"]][0].split([cfg.dim, cfg.kv_dim, cfg.kv_dim])
        hf[n["o"]] = state[n["out"]][0]
        hf[n["gate"]], hf[n["up"]] = state[n["w13"]][0].chunk(2)
        hf[n["down"]] = state[n["w2"]][0]
        hf[n["input_norm"]], hf[n["post_norm"]] = state[n["attn_norm"]][0], state[n["ffn_norm"]][0]
        for part in ("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"):
            hf[n[part]] = state[ours + part][0]
    return {k: v.contiguous() for k, v in hf.items()}


def import_hf(folder: str | Path, out: str | Path, dtype: torch.dtype = torch.float32,
              vqgan: tuple[str | Path, str | Path] | None = None) -> Path:
    """Write OUT as a mot run folder holding the Chameleon model of FOLDER; returns its checkpoint.

    vqgan: (checkpoint, YAML) of the taming-format VQGAN released with the model: the image tokenizer then has
    its decoder (checked to be the same VQGAN)."""
    folder, out = Path(folder), Path(out)
    if runs.list_checkpoints(out / "checkpoints"):
        raise ChameleonImportError(f"--out {out}: already holds checkpoints; choose a new folder")
    config, hf = read_hf_folder(folder)
    if "vocabulary_map" not in config:
        raise ChameleonImportError(f"{folder}/config.json: no vocabulary_map (needed to find the image tokens)")
    vocab = ChameleonVocab.from_vocabulary_map(config["vocabulary_map"], config["vocab_size"])
    model_cfg = model_config_from_hf(config, vocab)
    table = vocab.mot_to_hf(UnifiedVocab(model_cfg))
    state = {k: v.to(dtype) for k, v in state_from_hf(hf, model_cfg, table).items()}
    train = TrainConfig(out_dir=str(out.parent), seq_len=min(TrainConfig.seq_len, model_cfg.max_seq_len))
    cfg = config_from_dict(config_to_dict(RunConfig(name=out.name, model=model_cfg, train=train)),
                           where=f"{folder}/config.json")  # checked before anything is written
    meta = {"config": config_to_dict(cfg), "tokenizers": "", "operation": "import-hf", "derived_from": str(folder),
            "weights_only": True, "tokens_seen": 0, "flops_seen": 0.0}
    vqvae = {k: v.contiguous() for k, v in hf.items() if k.startswith(VQVAE_PREFIX)}
    image_tokenizer = image_tokenizer_from_hf(config, hf) if vqvae else None  # fails before anything is written
    if vqgan is not None:
        if image_tokenizer is None:
            raise ChameleonImportError(f"{folder}: no VQVAE tensors (model.vqmodel.*) to check --vqgan against")
        image_tokenizer = with_taming_decoder(vqvae, Path(vqgan[0]), Path(vqgan[1]))
    path = ckpt.save_checkpoint(out / "checkpoints", 0, state, {}, meta, keep=1)
    (out / VOCAB_FILE).write_text(json.dumps({"mapping": vocab.to_dict(), "hf_config": config}))
    if vqvae:  # kept as released (export writes them back), and as mot's image tokenizer (encoder only)
        save_file(vqvae, str(out / VQVAE_FILE))
        image_tokenizer.save(out / "tokenizers" / "image")
    if (folder / "tokenizer.json").is_file():  # Chameleon's file as released, with mot's text ids beside it
        text = out / "tokenizers" / "text"
        text.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / "tokenizer.json", text / "tokenizer.json")
        (text / ID_MAP_FILE).write_text(json.dumps({"ids": vocab.text_ids}))
    from mot.grow import recipe_toml  # the run folder's recipe, written the way `mot upcycle` writes it

    (out / "recipe.toml").write_text(recipe_toml(cfg))
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    return path


def export_hf(run: str | Path, out: str | Path) -> Path:
    """Write OUT as a Hugging Face Chameleon folder (config.json, model.safetensors) of a dense run's latest
    checkpoint (or of the checkpoint folder RUN)."""
    found = runs.resolve_checkpoint(run)
    meta = runs.read_meta(found)
    cfg = config_from_dict(meta["config"], where=f"{found}/meta.json").model
    _check_exportable(cfg)
    run_dir = found.parent.parent
    saved = json.loads((run_dir / VOCAB_FILE).read_text()) if (run_dir / VOCAB_FILE).is_file() else None
    imported = meta.get("operation") == "import-hf" or (run_dir / "tokenizers" / "text" / ID_MAP_FILE).is_file()
    if saved is None and imported:
        raise ChameleonImportError(f"{run_dir}: an imported model (or its text tokenizer) but the run has no "
                                   f"{VOCAB_FILE} to map its ids back; copy it from the imported run folder")
    vocab = ChameleonVocab.from_dict(saved["mapping"]) if saved else identity_vocab(UnifiedVocab(cfg))
    table = vocab.mot_to_hf(UnifiedVocab(cfg))
    hf = state_to_hf(runs.load_model_state(found), cfg, table, vocab.hf_size)
    if (run_dir / VQVAE_FILE).is_file():
        hf.update(load_file(str(run_dir / VQVAE_FILE)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tmp-model.safetensors"
    save_file(hf, str(tmp), metadata={"format": "pt"})
    tmp.rename(out / "model.safetensors")
    config = hf_config_from_model(cfg, vocab, saved["hf_config"] if saved else None)
    text = run_dir / "tokenizers" / "text"
    if saved and (text / ID_MAP_FILE).is_file():  # the imported file, as it was released
        shutil.copy(text / "tokenizer.json", out / "tokenizer.json")
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out
