"""VQGAN image tokenizer: training lowers the loss, codes round-trip, taming checkpoints load 1:1."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from taming.modules.discriminator.model import NLayerDiscriminator

from mot.tokenize.base import ModalityTokenizer, TokenizerError
from mot.tokenize.image import ImageTokenizer, VQGANConfig, load_vqgan_config
from mot.tokenize.vqgan_train import codebook_usage, evaluate, psnr, train_vqgan

REPO = Path(__file__).resolve().parents[1]
COLORS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.7, 0.2], [0.1, 0.3, 0.9], [0.95, 0.8, 0.1]])


def shapes(n: int, res: int = 16, seed: int = 0) -> torch.Tensor:
    """(n, 3, res, res) squares and discs of saturated colours on a light background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(res) + 0.5, torch.arange(res) + 0.5, indexing="ij")
    out = torch.empty(n, 3, res, res)
    for i in range(n):
        img = torch.full((3, res, res), 0.92)
        size = res * (0.15 + 0.15 * float(torch.rand(1, generator=g)))
        cx, cy = (size + (res - 2 * size) * torch.rand(2, generator=g)).tolist()
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= size**2
        square = ((xx - cx).abs() <= size) & ((yy - cy).abs() <= size)
        img[:, disc if i % 2 else square] = COLORS[i % len(COLORS)][:, None]
        out[i] = img
    return out


def tiny_config(**overrides) -> VQGANConfig:
    base = dict(resolution=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32, embed_dim=8, n_embed=32,
                steps=40, batch_size=8, lr=2e-3, disc_start=30, disc_ndf=16, disc_layers=2)
    return VQGANConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqgan")
    metrics = train_vqgan(tiny_config(), shapes(32), folder, show_progress=False)
    return ImageTokenizer.load(folder), metrics, folder


def test_training_lowers_the_reconstruction_loss(trained):
    _, metrics, folder = trained
    rec = metrics["history"]["rec_loss"]
    assert sum(rec[-5:]) / 5 < 0.7 * sum(rec[:5]) / 5
    assert metrics["history"]["d_loss"][-1] > 0  # the discriminator ran from step 30
    assert (folder / "vqgan.safetensors").is_file() and (folder / "train_metrics.json").is_file()


def test_training_is_deterministic_under_a_seed(tmp_path):
    config = tiny_config(steps=3, disc_start=1, restart_dead_codes=2)
    a = train_vqgan(config, shapes(8), tmp_path / "a", show_progress=False)
    b = train_vqgan(config, shapes(8), tmp_path / "b", show_progress=False)
    assert a["history"] == b["history"]
    wa, wb = ImageTokenizer.load(tmp_path / "a").state_dict(), ImageTokenizer.load(tmp_path / "b").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_encode_decode_shapes_ranges_and_protocol(trained):
    tok, _, _ = trained
    assert isinstance(tok, ModalityTokenizer) and tok.modality == "image" and tok.vocab_size == 32
    assert tok.grid_size() == (8, 8) and tok.grid_size(32) == (16, 16)
    x = shapes(3, seed=5)
    codes = tok.encode(x)
    assert codes.shape == (3, 64) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    images = tok.decode(codes)
    assert images.shape == (3, 3, 16, 16) and float(images.min()) >= 0 and float(images.max()) <= 1
    one = tok.encode(x[1])  # one image in, one flat code row out
    assert torch.equal(one, codes[1]) and tok.decode(one).shape == (3, 16, 16)


def test_codes_are_row_major_and_latents_are_their_codebook_vectors(trained):
    tok, _, _ = trained
    x = shapes(2, seed=7)
    codes, z = tok.encode(x), tok.latents(x)
    assert z.shape == (2, 8, 8, 8) and torch.equal(z, tok.latents_from_codes(codes))
    table = tok.quantize.embedding.weight
    for b, i, j in ((0, 0, 0), (1, 2, 5), (0, 7, 3)):
        assert torch.equal(z[b, :, i, j], table[codes[b, i * 8 + j]])
    assert torch.allclose(tok.decode_latents(z), tok.decode(codes))
    assert tok.latents(x, quantized=False).shape == (2, 8, 8, 8)


def test_save_load_round_trip_gives_identical_codes(trained, tmp_path):
    tok, _, _ = trained
    tok.save(tmp_path)
    again = ImageTokenizer.load(tmp_path)
    x = shapes(4, seed=9)
    assert again.config == tok.config
    assert torch.equal(again.encode(x), tok.encode(x))
    assert torch.equal(again.decode(tok.encode(x)), tok.decode(tok.encode(x)))


def test_evaluate_matches_hand_computed_psnr_and_usage(trained):
    tok, _, _ = trained
    x = shapes(6, seed=11)
    result = evaluate(tok, list(x), batch_size=4)
    recon = tok.decode(tok.encode(x))
    assert result["psnr"] == pytest.approx(sum(psnr(r, i) for r, i in zip(recon, x, strict=True)) / 6)
    assert result["used_codes"] == len(torch.unique(tok.encode(x))) and result["images"] == 6


def test_psnr_and_codebook_usage_against_hand_values():
    assert psnr(torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.1)) == pytest.approx(20.0)  # MSE 0.01
    assert psnr(torch.ones(3), torch.ones(3)) == math.inf
    uniform = codebook_usage(torch.arange(16).repeat(3), 32)
    assert uniform == {"perplexity": pytest.approx(16.0), "used_codes": 16, "dead_codes": 16}
    skewed = codebook_usage(torch.tensor([0, 0, 1, 2]), 8)  # p = (1/2, 1/4, 1/4): exp(H) = 2 ** 1.5
    assert skewed["perplexity"] == pytest.approx(2**1.5) and skewed["dead_codes"] == 5


# ---------------------------------------------------------------- taming checkpoints

TAMING_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 8
    n_embed: 32
    ddconfig:
      double_z: False
      z_channels: 32
      resolution: 16
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 2]
      num_res_blocks: 1
      attn_resolutions: [8]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: False
        disc_in_channels: 3
        disc_start: 250001
        disc_weight: 0.8
        codebook_weight: 1.0
"""


class NotATensor:
    """Stands in for a pytorch-lightning callback pickled into a checkpoint."""


def taming_checkpoint(folder: Path) -> tuple[ImageTokenizer, dict, Path]:
    torch.manual_seed(3)
    model = ImageTokenizer(tiny_config(attn_resolutions=[8]))
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()  # taming's init is near zero; spread the codes
    state = dict(model.state_dict())
    state |= {f"loss.discriminator.{k}": v for k, v in NLayerDiscriminator(3, 8, 2).state_dict().items()}
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    (folder / "vqgan.yaml").write_text(TAMING_YAML)
    return model, state, folder / "vqgan.yaml"


def test_taming_key_layout():
    keys = set(ImageTokenizer(tiny_config(attn_resolutions=[8])).state_dict())
    for key in ("encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight",
                "encoder.down.0.downsample.conv.weight", "encoder.down.1.attn.0.q.weight",
                "encoder.mid.attn_1.proj_out.weight", "decoder.up.1.upsample.conv.bias", "decoder.up.1.attn.1.k.bias",
                "decoder.up.0.block.1.conv2.weight", "decoder.conv_out.weight", "quantize.embedding.weight",
                "quant_conv.weight", "post_quant_conv.bias"):
        assert key in keys, key


def test_from_taming_loads_a_checkpoint_and_matches_its_model(tmp_path):
    model, state, yaml_path = taming_checkpoint(tmp_path)
    torch.save({"state_dict": state, "global_step": 7, "epoch": 1}, tmp_path / "last.ckpt")
    loaded = ImageTokenizer.from_taming(tmp_path / "last.ckpt", yaml_path)
    assert loaded.config.disc_start == 250001 and loaded.config.attn_resolutions == [8]
    x = shapes(3, seed=13)
    codes = model.encode(x)
    assert len(torch.unique(codes)) > 1
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_from_taming_names_the_file_and_the_missing_key(tmp_path):
    _, state, yaml_path = taming_checkpoint(tmp_path)
    del state["decoder.conv_out.weight"]
    torch.save({"state_dict": state}, tmp_path / "broken.ckpt")
    with pytest.raises(TokenizerError, match=r"broken\.ckpt.*missing keys: decoder\.conv_out\.weight"):
        ImageTokenizer.from_taming(tmp_path / "broken.ckpt", yaml_path)


def test_from_taming_refuses_pickled_objects_and_explains_the_conversion(tmp_path):
    _, state, yaml_path = taming_checkpoint(tmp_path)
    torch.save({"state_dict": state, "callbacks": NotATensor()}, tmp_path / "lightning.ckpt")
    with pytest.raises(TokenizerError, match=r"lightning\.ckpt: refused.*weights_only=True.*safetensors"):
        ImageTokenizer.from_taming(tmp_path / "lightning.ckpt", yaml_path)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (torch.rand(4, 16, 16), r"shape \(3, H, W\)"),
        (torch.rand(3, 16, 16) * 2 - 1, r"\[0, 1\].*\(x \+ 1\) / 2"),
        ((torch.rand(3, 16, 16) * 255).to(torch.uint8), r"dtype torch\.uint8"),
        (torch.rand(3, 15, 16), r"15x16 is not a positive multiple of the downsampling factor 2"),
    ],
)
def test_bad_images_get_a_clear_error(image, message):
    with pytest.raises(TokenizerError, match=message):
        ImageTokenizer(tiny_config()).encode(image)


def test_bad_codes_configs_and_files_get_a_clear_error(tmp_path):
    tok = ImageTokenizer(tiny_config())
    with pytest.raises(TokenizerError, match=r"codes must be in \[0, 32\), got values in \[0, 40\]"):
        tok.decode(torch.tensor([0, 40, 1, 2]))
    with pytest.raises(TokenizerError, match=r"GroupNorm\(32\)"):
        tiny_config(ch=16).check()
    with pytest.raises(TokenizerError, match=r"vqgan\.toml: not found"):
        ImageTokenizer.load(tmp_path)
    (tmp_path / "bad.toml").write_text("n_embd = 512\n")
    with pytest.raises(TokenizerError, match=r"bad\.toml: unknown key 'n_embd' \(did you mean 'n_embed'\?\)"):
        load_vqgan_config(tmp_path / "bad.toml")
    with pytest.raises(TokenizerError, match=r"nowhere\.pth: LPIPS weights"):
        train_vqgan(tiny_config(perceptual=str(tmp_path / "nowhere.pth")), shapes(2), tmp_path, show_progress=False)


def test_demo_config_gives_64_tokens_of_512_codes():
    config = load_vqgan_config(REPO / "tokenizers" / "vqgan_demo.toml")
    assert (config.resolution, config.n_embed, config.downsample_factor) == (64, 512, 8)


def test_training_from_a_folder_skips_and_counts_unreadable_files(tmp_path):
    from PIL import Image

    for i, image in enumerate(shapes(3)):
        Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    metrics = train_vqgan(tiny_config(steps=2, batch_size=8), tmp_path, tmp_path / "out", show_progress=False)
    assert metrics["skipped_images"] == 1
