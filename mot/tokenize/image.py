"""VQGAN image tokenizer in taming-transformers' format: an image <-> a grid of codebook ids.

Encoder, Decoder and VectorQuantizer2 come from `taming` (taming-transformers), and the
module names match taming's `VQModel` (encoder.*, decoder.*, quantize.embedding.weight,
quant_conv.*, post_quant_conv.*), so a released taming checkpoint (e.g. the 8192-code VQGAN
Chameleon shipped with) maps 1:1 through `ImageTokenizer.from_taming`. `taming.models` is never
imported: it needs pytorch-lightning.

Images are float (3, H, W) or (B, 3, H, W) in [0, 1]; the network sees [-1, 1], as in taming.
Codes are int64, flattened row-major over the latent grid: (h * w,) or (B, h * w).
Training and metrics (psnr, codebook_usage, evaluate) live in `mot.tokenize.vqgan_train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from einops import rearrange
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2
from torch import nn

from mot.config import ConfigError, _build
from mot.tokenize.base import TokenizerError, config_to_toml, load_tokenizer_config, write_atomic

WEIGHTS_FILE = "vqgan.safetensors"
CONFIG_FILE = "vqgan.toml"
GROUPNORM_GROUPS = 32  # taming's Normalize is GroupNorm(32, C): every width must be a multiple of 32


@dataclass
class VQGANConfig:
    # --- architecture: taming's ddconfig, plus n_embed / embed_dim of its VQModel
    resolution: int = 64
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 32
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2])  # downsampling factor 2**(len-1)
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=list)
    z_channels: int = 64
    double_z: bool = False
    dropout: float = 0.0
    n_embed: int = 512  # codebook size = the image modality's vocabulary
    embed_dim: int = 32  # codebook vector size (the continuous latent's channels)
    # How `mot prepare` brings an image of any size to `resolution` (mot.data.media.IMAGE_POLICIES):
    # "center_crop" scales the shorter side and crops the centre (taming's and Chameleon's), "pad" fits the
    # whole image on white.
    preprocess: Literal["center_crop", "pad"] = "center_crop"
    # false: encoder and quantizer only (Chameleon's VQVAE as transformers ships it, `mot import-hf`); images
    # encode to codes, decoding them raises until a taming checkpoint of the same VQGAN supplies the decoder.
    has_decoder: bool = True
    # --- training (mot.tokenize.vqgan_train)
    seed: int = 0
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-4
    beta: float = 0.25  # commitment weight of VectorQuantizer2
    # taming's default (legacy=True) puts beta on the codebook term instead of the commitment term;
    # false = the VQ-VAE paper's placement. Training only: the weights and codes are the same either way.
    legacy_beta: bool = True
    codebook_weight: float = 1.0
    pixel_loss: Literal["l1", "l2"] = "l1"
    perceptual: str = ""  # local LPIPS weights file; "" = no perceptual loss (taming's LPIPS downloads VGG)
    perceptual_weight: float = 1.0
    disc_start: int = 10_000  # step at which the patch discriminator starts; >= steps = never
    disc_weight: float = 0.8  # times taming's adaptive weight ||grad rec|| / ||grad gan|| at the last layer
    disc_layers: int = 2
    disc_ndf: int = 64
    restart_dead_codes: int = 0  # every N steps re-seed codes unused for N steps from encoder outputs; 0 = off

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def ddconfig(self) -> dict:
        keys = ("resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                "z_channels", "double_z", "dropout")
        return {k: getattr(self, k) for k in keys}

    def check(self, where: str = "VQGANConfig") -> VQGANConfig:
        def fail(key: str, why: str):
            raise TokenizerError(f"{where}: '{key}' {why}")

        for key in ("resolution", "ch", "num_res_blocks", "z_channels", "n_embed", "embed_dim", "steps",
                    "batch_size"):
            if getattr(self, key) <= 0:
                fail(key, f"must be positive, got {getattr(self, key)}")
        if self.in_channels != 3 or self.out_ch != 3:
            fail("in_channels/out_ch", f"must be 3 (RGB), got {self.in_channels}/{self.out_ch}")
        if self.double_z:
            fail("double_z", "must be false for a VQGAN (true is taming's KL autoencoder)")
        if not self.ch_mult or min(self.ch_mult) <= 0:
            fail("ch_mult", f"must be a non-empty list of positive ints, got {self.ch_mult}")
        widths = sorted({self.ch * m for m in self.ch_mult})
        if any(w % GROUPNORM_GROUPS for w in widths):
            fail("ch", f"times ch_mult gives widths {widths}; taming normalises with GroupNorm(32), "
                       "so each must be a multiple of 32 (use ch = 32, 64, ...)")
        if self.resolution % self.downsample_factor:
            fail("resolution", f"({self.resolution}) must be a multiple of the downsampling factor "
                               f"{self.downsample_factor} (2 ** (len(ch_mult) - 1))")
        if self.preprocess not in ("center_crop", "pad"):
            fail("preprocess", f"must be 'center_crop' or 'pad', got {self.preprocess!r}")
        if not 0 <= self.dropout < 1:
            fail("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            fail("lr", f"must be positive, got {self.lr}")
        for key in ("beta", "codebook_weight", "perceptual_weight", "disc_weight", "disc_start", "restart_dead_codes"):
            if getattr(self, key) < 0:
                fail(key, f"must be >= 0, got {getattr(self, key)}")
        if self.disc_layers <= 0 or self.disc_ndf <= 0:
            fail("disc_layers/disc_ndf", f"must be positive, got {self.disc_layers}/{self.disc_ndf}")
        return self


def load_vqgan_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> VQGANConfig:
    """A VQGANConfig from TOML (e.g. tokenizers/vqgan_demo.toml), every key checked."""
    return load_tokenizer_config(VQGANConfig, path, overrides)


# ---------------------------------------------------------------- the tokenizer


class ImageTokenizer(nn.Module):
    """A taming-format VQGAN behind the ModalityTokenizer protocol (local ids 0..n_embed-1)."""

    modality = "image"

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config.check()
        with contextlib.redirect_stdout(io.StringIO()):  # taming's Decoder prints the z shape
            self.encoder = Encoder(**config.ddconfig())
            self.decoder = Decoder(**config.ddconfig()) if config.has_decoder else None
        self.quantize = VectorQuantizer2(config.n_embed, config.embed_dim, beta=config.beta, legacy=config.legacy_beta)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def vocab_size(self) -> int:
        return self.config.n_embed

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def preprocess(self) -> str:
        return self.config.preprocess

    def grid_size(self, resolution: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """(h, w) of the code grid for an image of `resolution` (int = square; None = the config's)."""
        if resolution is None:
            resolution = self.config.resolution
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
        f = self.downsample_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise TokenizerError(f"image size {height}x{width} is not a positive multiple of the VQGAN's "
                                 f"downsampling factor {f}")
        return height // f, width // f

    # -- taming's VQModel, on [-1, 1] images

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> (reconstruction in ~[-1, 1], codebook loss, codes (B, h*w))."""
        z_q, codebook_loss, codes = self._quantize(x)
        return self._decode_quantized(z_q), codebook_loss, codes

    def pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def _quantize(self, x: torch.Tensor):
        z_q, codebook_loss, (_, _, codes) = self.quantize(self.pre_quant(x))
        return z_q, codebook_loss, codes.view(x.shape[0], -1)  # VectorQuantizer2 flattens b h w row-major

    def _decode_quantized(self, z_q: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise TokenizerError("this VQGAN has no decoder (has_decoder = false: an encoder-only import such as "
                                 "Chameleon's VQVAE); load the taming checkpoint of the same VQGAN "
                                 "(ImageTokenizer.from_taming) to turn codes into images")
        return self.decoder(self.post_quant_conv(z_q))

    # -- the protocol, on [0, 1] images

    def _images(self, image: torch.Tensor) -> tuple[torch.Tensor, bool]:
        batch = check_images(image, self.downsample_factor)
        return batch.to(self.quant_conv.weight) * 2 - 1, image.dim() == 3

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) or (B, 3, H, W) in [0, 1] -> int64 codes (h*w,) or (B, h*w), row-major."""
        x, single = self._images(image)
        codes = self._quantize(x)[2]
        return codes[0] if single else codes

    @torch.no_grad()
    def latents(self, image: torch.Tensor, quantized: bool = True) -> torch.Tensor:
        """(B, embed_dim, h, w) codebook vectors of the image's codes ((embed_dim, h, w) for one image).

        quantized=False gives the encoder output before quantization instead.
        """
        x, single = self._images(image)
        if quantized:  # exact table rows: the straight-through z + (z_q - z) of the quantizer is off by rounding
            codes = self._quantize(x)[2]
            h = x.shape[-2] // self.downsample_factor
            z = rearrange(self.quantize.embedding(codes), "b (h w) c -> b c h w", h=h)
        else:
            z = self.pre_quant(x)
        return z[0] if single else z

    def _codes(self, codes: torch.Tensor, grid: tuple[int, int] | None) -> tuple[torch.Tensor, tuple[int, int]]:
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TokenizerError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes))}")
        if codes.dim() not in (1, 2) or codes.shape[-1] == 0:
            raise TokenizerError(f"codes must have shape (h*w,) or (B, h*w), got {tuple(codes.shape)}")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.vocab_size:
            raise TokenizerError(f"codes must be in [0, {self.vocab_size}), got values in [{low}, {high}]")
        n = codes.shape[-1]
        if grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise TokenizerError(f"{n} codes do not form a square grid: pass grid=(h, w)")
            grid = (side, side)
        if grid[0] * grid[1] != n:
            raise TokenizerError(f"grid {grid} holds {grid[0] * grid[1]} codes, got {n}")
        return codes.reshape(-1, n).to(self.quant_conv.weight.device, torch.long), grid

    @torch.no_grad()
    def latents_from_codes(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Codes (h*w,) or (B, h*w) -> codebook vectors (embed_dim, h, w) or (B, embed_dim, h, w)."""
        flat, (h, w) = self._codes(codes, grid)
        z = rearrange(self.quantize.embedding(flat), "b (h w) c -> b c h w", h=h, w=w)
        return z[0] if codes.dim() == 1 else z

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) or (embed_dim, h, w) latents -> images in [0, 1]."""
        if latents.dim() not in (3, 4) or latents.shape[-3] != self.config.embed_dim:
            raise TokenizerError(f"latents must be (B, {self.config.embed_dim}, h, w), got {tuple(latents.shape)}")
        z = latents.reshape(-1, *latents.shape[-3:]).to(self.quant_conv.weight)
        images = ((self._decode_quantized(z) + 1) / 2).clamp(0, 1)
        return images[0] if latents.dim() == 3 else images

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Codes (h*w,) or (B, h*w) -> images (3, H, W) or (B, 3, H, W) in [0, 1]; grid defaults to square."""
        return self.decode_latents(self.latents_from_codes(codes, grid))

    # -- files

    def save(self, folder: str | Path) -> None:
        """folder/vqgan.safetensors (taming's key layout) + folder/vqgan.toml (the config), written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        write_atomic(folder / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": "taming-vqgan"}))
        text = config_to_toml(self.config)
        write_atomic(folder / CONFIG_FILE, lambda p: p.write_text(text))

    @classmethod
    def load(cls, folder: str | Path) -> ImageTokenizer:
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise TokenizerError(f"{folder / name}: not found (an image tokenizer folder holds "
                                     f"{CONFIG_FILE} and {WEIGHTS_FILE}, written by ImageTokenizer.save)")
        model = cls(load_vqgan_config(folder / CONFIG_FILE))
        model.load_weights(_read_state(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE)
        return model.eval()

    @classmethod
    def from_taming(cls, ckpt_path: str | Path, yaml_path: str | Path) -> ImageTokenizer:
        """A taming-format VQGAN: checkpoint (.ckpt with "state_dict", or .safetensors) + its YAML config.

        Loaded with torch.load(weights_only=True), never a plain unpickle. `loss.*` entries
        (discriminator, LPIPS) are ignored.
        """
        model = cls(config_from_taming_yaml(yaml_path))
        state = {k: v for k, v in _read_state(Path(ckpt_path)).items() if not k.startswith("loss.")}
        model.load_weights(state, Path(ckpt_path))
        return model.eval()

    def load_weights(self, state: dict[str, torch.Tensor], source: Path) -> None:
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = [f"{k} {tuple(state[k].shape)} (model: {tuple(own[k].shape)})"
                 for k in own if k in state and state[k].shape != own[k].shape]
        problems = [f"{len(keys)} {what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                       ("shape mismatches", wrong)) if keys]
        if problems:
            raise TokenizerError(f"{source}: weights do not fit the VQGAN config: " + "; ".join(problems))
        self.load_state_dict(state)


def config_from_taming_yaml(path: str | Path) -> VQGANConfig:
    """VQGANConfig from a taming YAML (model.params: ddconfig, n_embed, embed_dim, lossconfig)."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: taming config (YAML) not found")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TokenizerError(f"{path}: not valid YAML: {err}") from None
    params = (doc or {}).get("model", {}).get("params") if isinstance(doc, dict) else None
    if not isinstance(params, dict) or not isinstance(params.get("ddconfig"), dict):
        raise TokenizerError(f"{path}: expected taming's layout model.params.ddconfig (with n_embed, embed_dim)")
    target = str(doc["model"].get("target", ""))
    if "Gumbel" in target or params.get("remap"):
        raise TokenizerError(f"{path}: {target or 'remap'} is not supported; only VQModel with VectorQuantizer2")
    if params["ddconfig"].get("resamp_with_conv", True) is not True:
        raise TokenizerError(f"{path}: ddconfig.resamp_with_conv=false is not supported")
    fields = {f.name for f in dataclasses.fields(VQGANConfig)}
    data = {k: v for k, v in params["ddconfig"].items() if k in fields}
    for key in ("n_embed", "embed_dim"):
        if key not in params:
            raise TokenizerError(f"{path}: model.params.{key} is missing")
        data[key] = params[key]
    loss = (params.get("lossconfig") or {}).get("params") or {}
    data.update({k: loss[k] for k in ("disc_start", "disc_weight", "codebook_weight") if k in loss})
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    try:
        config = _build(VQGANConfig, data, "model.params", str(path))
    except ConfigError as err:
        raise TokenizerError(str(err)) from None
    return config.check(str(path))


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise TokenizerError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise TokenizerError(f"{path}: not a readable safetensors file: {err}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise TokenizerError(
            f"{path}: refused: the checkpoint holds pickled Python objects besides tensors (e.g. "
            f"pytorch-lightning callbacks), and mot loads checkpoints with weights_only=True only. "
            f"Where you trust the file, convert it once to safetensors (read its 'state_dict' with "
            f"torch.load and weights_only=False, drop the 'loss.*' keys, write it with "
            f"safetensors.torch.save_file to {path.with_suffix('.safetensors')}) and pass that file instead. "
            f"({str(err).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise TokenizerError(f"{path}: not a readable PyTorch checkpoint: {err}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TokenizerError(f"{path}: expected a dict with a 'state_dict' of tensors (taming's format)")
    return state


def check_images(image: torch.Tensor, factor: int = 1, where: str = "image") -> torch.Tensor:
    """Validate (3, H, W) / (B, 3, H, W) float images in [0, 1]; return them batched."""
    if not isinstance(image, torch.Tensor):
        raise TokenizerError(f"{where}: expected a torch.Tensor, got {type(image).__name__}")
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise TokenizerError(f"{where}: expected shape (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
    if not image.dtype.is_floating_point:
        raise TokenizerError(f"{where}: expected float values in [0, 1], got dtype {image.dtype} "
                             "(for uint8 pixels use image.float() / 255)")
    height, width = image.shape[-2:]
    if height % factor or width % factor or height == 0 or width == 0:
        raise TokenizerError(f"{where}: size {height}x{width} is not a positive multiple of the downsampling "
                             f"factor {factor}")
    low, high = float(image.min()), float(image.max())
    if not (math.isfinite(low) and math.isfinite(high)) or low < -1e-4 or high > 1 + 1e-4:
        hint = " (looks like [-1, 1]: use (x + 1) / 2)" if low < 0 else ""
        raise TokenizerError(f"{where}: values must be in [0, 1], got [{low:.3g}, {high:.3g}]{hint}")
    image = image.clamp(0, 1)  # forgive rounding just outside the range
    return image if image.dim() == 4 else image[None]


def stack_images(items, where: str = "images") -> torch.Tensor:
    """A list of (3, H, W) tensors of one size -> (N, 3, H, W)."""
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise TokenizerError(f"{where}[{i}]: expected a (3, H, W) tensor, got {type(item).__name__}")
        if item.shape != items[0].shape:
            raise TokenizerError(f"{where}[{i}]: shape {tuple(item.shape)} differs from the first item's "
                                 f"{tuple(items[0].shape)}; resize images to one size")
    return torch.stack(list(items))
