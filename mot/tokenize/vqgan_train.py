"""Train the VQGAN image tokenizer on local images: our own loop, taming's losses.

    config = load_vqgan_config("tokenizers/vqgan_demo.toml")
    metrics = train_vqgan(config, "data/images", "out/vqgan")   # or a (N, 3, H, W) tensor in [0, 1]

Loss (as taming's VQLPIPSWithDiscriminator, on [-1, 1] images; `pixel_loss` "l2" squares the error):
    mean(|x - x_rec|  [+ perceptual_weight * LPIPS])  +  codebook_weight * codebook/commitment loss
    + from step `disc_start`:  d_weight * (-mean D(x_rec))
where d_weight is taming's adaptive weight, ||grad rec|| / ||grad gan|| at the decoder's last
layer (clamped to [0, 1e4]) times `disc_weight`, and D is a PatchGAN (NLayerDiscriminator)
trained with the hinge loss by its own Adam. Both optimizers use taming's betas (0.5, 0.9).
Not in taming: `restart_dead_codes` re-seeds unused codebook rows from encoder outputs, which
keeps most of a small-data codebook alive (perplexity ~20 -> ~200 of 512 on the demo shapes).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file
from taming.modules.discriminator.model import NLayerDiscriminator, weights_init
from torch import nn
from tqdm import tqdm

from mot.tokenize.base import TokenizerError
from mot.tokenize.image import (
    ImageTokenizer,
    VQGANConfig,
    check_images,
    stack_images,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


# ---------------------------------------------------------------- data


class ImageFolder:
    """Every image under `folder` (recursive), centre-cropped square and resized to `resolution`, in [0, 1]."""

    def __init__(self, folder: str | Path, resolution: int):
        self.folder, self.resolution = Path(folder), resolution
        if not self.folder.is_dir():
            raise TokenizerError(f"{self.folder}: image folder not found")
        self.paths = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise TokenizerError(f"{self.folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image, ImageOps

        path = self.paths[index]
        try:
            with Image.open(path) as img:
                img = ImageOps.fit(img.convert("RGB"), (self.resolution,) * 2, Image.Resampling.BICUBIC)
                pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise TokenizerError(f"{path}: unreadable image: {err}") from None
        return rearrange(pixels, "(h w c) -> c h w", h=self.resolution, c=3).float() / 255


def _as_dataset(images, resolution: int):
    """A tensor (N, 3, H, W) or a sequence of (3, H, W) tensors indexable by int."""
    if isinstance(images, str | Path):
        return ImageFolder(images, resolution)
    if isinstance(images, torch.Tensor):
        return check_images(images, where="training images")
    if not (hasattr(images, "__len__") and hasattr(images, "__getitem__")):
        images = list(images)  # a plain iterable: hold it in memory
    if isinstance(images, list | tuple):
        if not images:
            raise TokenizerError("training images: none given")
        return check_images(stack_images(images, "training images"), where="training images")
    if len(images) == 0:
        raise TokenizerError("training images: the dataset is empty")
    return images


class _Batches:
    """Random batches (with replacement, seeded); unreadable files are skipped, counted and logged."""

    def __init__(self, data, batch_size: int, factor: int, generator: torch.Generator):
        self.data, self.batch_size, self.factor, self.generator = data, batch_size, factor, generator
        self.bad: set[int] = set()

    def __call__(self) -> torch.Tensor:
        n = len(self.data)
        if isinstance(self.data, torch.Tensor):
            return check_images(self.data[torch.randint(n, (self.batch_size,), generator=self.generator)],
                                self.factor, "training batch")
        items = []
        while len(items) < self.batch_size:
            index = int(torch.randint(n, (1,), generator=self.generator))
            if index in self.bad:
                continue
            try:
                items.append(self.data[index])
            except TokenizerError as err:
                self.bad.add(index)
                log.warning("skipping %s", err)
                if len(self.bad) == n:
                    raise TokenizerError("training images: every image is unreadable") from None
        return check_images(stack_images(items, "training batch"), self.factor, "training batch")


# ---------------------------------------------------------------- losses


class LPIPS(nn.Module):
    """LPIPS (VGG16) with taming's key layout and maths, built from a local file; nothing is downloaded.

    taming's own LPIPS fetches VGG16 and its linear heads from the internet (and imports
    `requests`). The file holds the VGG16 features, as `net.sliceK.I.*` (taming) or
    `features.I.*` (torchvision's vgg16 state dict), plus the heads `linK.model.1.weight`
    (taming's vgg.pth), as safetensors or a weights-only torch file.
    """

    slices = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # VGG16 feature indices up to relu1_2 ... relu5_3
    channels = (64, 128, 256, 512, 512)

    def __init__(self, path: str | Path):
        super().__init__()
        from torchvision.models import vgg16

        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)
        features = vgg16(weights=None).features
        self.net = nn.Module()
        for k, (start, stop) in enumerate(self.slices, 1):
            block = nn.Sequential()
            for i in range(start, stop):
                block.add_module(str(i), features[i])
            setattr(self.net, f"slice{k}", block)
        for k, c in enumerate(self.channels):  # Dropout at model.0 keeps taming's key name model.1
            setattr(self, f"lin{k}", nn.Module())
            getattr(self, f"lin{k}").model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
        self._load(Path(path))
        self.requires_grad_(False).eval()

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise TokenizerError(f"{path}: LPIPS weights ('perceptual') not found; set perceptual = \"\" to train "
                                 "without the perceptual loss")
        try:
            if path.suffix == ".safetensors":
                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to read is the same problem for the user
            raise TokenizerError(f"{path}: cannot read LPIPS weights ({err})") from None
        slice_of = {i: k for k, (a, b) in enumerate(self.slices, 1) for i in range(a, b)}
        renamed = {}
        for key, value in state.items():
            if key.startswith("features."):
                index, rest = key.removeprefix("features.").split(".", 1)
                if int(index) not in slice_of:
                    continue  # layers past relu5_3
                key = f"net.slice{slice_of[int(index)]}.{index}.{rest}"
            renamed[key] = value
        missing, unexpected = self.load_state_dict(renamed, strict=False)
        if missing:
            raise TokenizerError(f"{path}: LPIPS weights lack {len(missing)} entries, e.g. {missing[:4]}; the file "
                                 "needs VGG16 features (net.sliceK.I.* or features.I.*) and lin0..4 heads")
        if unexpected:
            log.warning("%s: ignoring %d unknown LPIPS entries, e.g. %s", path, len(unexpected), unexpected[:4])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, 1) perceptual distance of images in [-1, 1]."""
        fx, fy = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = 0
        for k in range(len(self.slices)):
            block = getattr(self.net, f"slice{k + 1}")
            fx, fy = block(fx), block(fy)
            nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}").model((nx - ny) ** 2).mean((2, 3), keepdim=True)
        return total


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """taming's balance: scale the GAN gradient to the reconstruction gradient's size at the last layer."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach()


@torch.no_grad()
def restart_dead_codes(model: ImageTokenizer, counts: torch.Tensor, z: torch.Tensor,
                       generator: torch.Generator) -> int:
    """Re-seed codes with no hits in `counts` from random encoder outputs `z` (B, C, h, w) of this batch."""
    dead = (counts == 0).nonzero().flatten()
    if len(dead):
        flat = rearrange(z, "b c h w -> (b h w) c")
        pick = torch.randint(len(flat), (len(dead),), generator=generator)
        model.quantize.embedding.weight[dead.to(z.device)] = flat[pick.to(z.device)]
    return len(dead)


# ---------------------------------------------------------------- metrics


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements: 10 log10(range^2 / MSE); inf when equal."""
    mse = float(torch.mean((x.double() - y.double()) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def codebook_usage(codes: torch.Tensor, n_embed: int) -> dict[str, float]:
    """Perplexity exp(H) of the code histogram (n_embed when uniform over all), used and dead codes."""
    counts = torch.bincount(codes.reshape(-1).long().cpu(), minlength=n_embed).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {"perplexity": float(entropy.exp()), "used_codes": used, "dead_codes": n_embed - used}


@torch.no_grad()
def evaluate(tokenizer: ImageTokenizer, images, batch_size: int = 32) -> dict[str, float]:
    """Reconstruct `images` ((N, 3, H, W) tensor or a sequence of (3, H, W)) through the codes.

    psnr is the mean of per-image PSNRs (dB, images in [0, 1]); codebook usage is over all codes.
    """
    scores, all_codes, mse = [], [], 0.0
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        chunk = images[start:stop] if isinstance(images, torch.Tensor) else [images[i] for i in range(start, stop)]
        if not isinstance(chunk, torch.Tensor):
            chunk = stack_images(chunk, f"images[{start}:{stop}]")
        batch = check_images(chunk, tokenizer.downsample_factor, f"images[{start}:{stop}]")
        codes = tokenizer.encode(batch)
        recon = tokenizer.decode(codes, tokenizer.grid_size(tuple(batch.shape[-2:]))).to(batch)
        scores += [psnr(r, b) for r, b in zip(recon, batch, strict=True)]
        mse += float(((recon - batch) ** 2).mean(dim=(1, 2, 3)).sum())
        all_codes.append(codes.cpu())
    if not scores:
        raise TokenizerError("evaluate: no images given")
    usage = codebook_usage(torch.cat(all_codes), tokenizer.vocab_size)
    return {"psnr": sum(scores) / len(scores), "mse": mse / len(scores), **usage, "images": len(scores)}


# ---------------------------------------------------------------- the loop


def _mean_tail(values: list[float], n: int = 10) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail) if tail else float("nan")


def train_vqgan(config: VQGANConfig, images, out_folder: str | Path, show_progress: bool = True,
                eval_images=None, device: str | torch.device = "cpu") -> dict:
    """Train a VQGAN on `images` ((N, 3, H, W) in [0, 1], a sequence of (3, H, W), or a folder of
    images), save it to `out_folder` (vqgan.safetensors + vqgan.toml + train_metrics.json) and
    return the metrics: mean loss / PSNR of the last 10 steps, codebook usage of the last 50
    steps' codes, per-step history, and `eval` (see `evaluate`) when `eval_images` are given."""
    config.check()
    if not config.has_decoder:
        raise TokenizerError("has_decoder = false: a VQGAN is trained with its decoder; set has_decoder = true")
    data = _as_dataset(images, config.resolution)
    lpips = LPIPS(config.perceptual).to(device) if config.perceptual else None  # a bad path fails before work
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(config.seed)
        model = ImageTokenizer(config).to(device).train()
        use_gan = config.disc_start < config.steps and config.disc_weight > 0
        if use_gan:
            disc = NLayerDiscriminator(3, config.disc_ndf, config.disc_layers).apply(weights_init).to(device)
            opt_d = torch.optim.Adam(disc.parameters(), lr=config.lr, betas=(0.5, 0.9))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.5, 0.9))
    if lpips is None:
        log.info("VQGAN: no perceptual loss (config.perceptual is empty; taming's LPIPS would download VGG16 "
                 "weights, so give a local LPIPS weights file to use it)")
    log.info("VQGAN: %d images, %d steps of %d, GAN from step %s, %d codes, %dx%d tokens per image", len(data),
             config.steps, config.batch_size, config.disc_start if use_gan else "never", config.n_embed,
             *(config.resolution // config.downsample_factor,) * 2)

    batches = _Batches(data, config.batch_size, config.downsample_factor, generator)
    history = {k: [] for k in ("loss", "rec_loss", "codebook_loss", "psnr", "g_loss", "d_loss", "d_weight")}
    recent_codes, dead_counts, restarted = [], torch.zeros(config.n_embed, dtype=torch.long), 0
    start = time.perf_counter()
    bar = tqdm(range(config.steps), disable=not show_progress, desc="vqgan", dynamic_ncols=True)
    for step in bar:
        x = batches().to(device) * 2 - 1
        z = model.pre_quant(x)
        z_q, codebook_loss, (_, _, codes) = model.quantize(z)
        x_rec = model.decoder(model.post_quant_conv(z_q))
        rec = (x - x_rec).abs() if config.pixel_loss == "l1" else (x - x_rec) ** 2
        if lpips is not None:
            rec = rec + config.perceptual_weight * lpips(x, x_rec)
        rec_loss = rec.mean()
        loss = rec_loss + config.codebook_weight * codebook_loss
        gan_on = use_gan and step >= config.disc_start
        if gan_on:
            g_loss = -disc(x_rec).mean()
            d_weight = adaptive_weight(rec_loss, g_loss, model.decoder.conv_out.weight) * config.disc_weight
            loss = loss + d_weight * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if gan_on:
            d_loss = hinge_d_loss(disc(x.detach()), disc(x_rec.detach()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

        codes = codes.detach().cpu()
        recent_codes = [*recent_codes[-49:], codes]
        if config.restart_dead_codes:
            dead_counts += torch.bincount(codes, minlength=config.n_embed)
            if (step + 1) % config.restart_dead_codes == 0 and step + 1 < config.steps:
                restarted += restart_dead_codes(model, dead_counts, z.detach(), generator)
                dead_counts.zero_()
        batch_psnr = psnr(((x_rec.detach() + 1) / 2).clamp(0, 1), (x + 1) / 2)
        for key, value in (("loss", loss), ("rec_loss", rec_loss), ("codebook_loss", codebook_loss),
                           ("psnr", batch_psnr), ("g_loss", g_loss if gan_on else 0.0),
                           ("d_loss", d_loss if gan_on else 0.0), ("d_weight", d_weight if gan_on else 0.0)):
            history[key].append(float(value.detach()) if isinstance(value, torch.Tensor) else float(value))
        bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", psnr=f"{batch_psnr:.2f}", refresh=False)
    wall = time.perf_counter() - start

    model.eval()
    model.save(out_folder)
    metrics = {
        "steps": config.steps,
        "wall_s": wall,
        "images_per_s": config.steps * config.batch_size / wall,
        "loss": _mean_tail(history["loss"]),
        "psnr": _mean_tail(history["psnr"]),
        **codebook_usage(torch.cat(recent_codes), config.n_embed),
        "restarted_codes": restarted,
        "skipped_images": len(batches.bad),
    }
    if eval_images is not None:
        metrics["eval"] = evaluate(model, eval_images)
    (Path(out_folder) / "train_metrics.json").write_text(json.dumps({**metrics, "history": history}, indent=1))
    log.info("VQGAN: %s", metrics)
    return {**metrics, "history": history}
