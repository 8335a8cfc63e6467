"""Images and speech features of many documents -> ids, in batches, on one device: the encoding half of prepare.

Prepare's workers decode (images to uint8 at the tokenizer's resolution, audio to the speech tokenizer's
normalised log-mel frames, `SpeechTokenizer.features`); these encoders turn whole batches of them into ids:

    ImageBatchEncoder   the VQGAN encoder + quantizer (an `ImageTokenizer`), channels-last, optionally compiled
    SpeechBatchEncoder  nearest codebook entry of every unit's features

`image_precision` sets the VQGAN encoder's arithmetic on CUDA (the quantizer's distances are always float32):

    fp32  float32, TF32 off: the CPU encoder's codes up to summation order
    tf32  convolutions and matmuls in TF32
    bf16  the encoder under bf16 autocast

On the CPU every precision runs in float32. How often each precision's codes equal the CPU's is measured by
tests/gpu/test_prepare_gpu.py and stated in the README.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import nn

PRECISIONS = ("fp32", "tf32", "bf16")
DEFAULT_IMAGE_PRECISION = "fp32"
CPU_BATCH_PIXELS = 2**20
CUDA_BATCH_PIXELS = 64 * 512 * 512  # 64 images of 512 px per call; thousands of small ones (launches cost)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" (or None): the current CUDA device when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: this machine has no CUDA device (use device='cpu' or 'auto')")
    return device


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"image_precision {precision!r}: choose from {list(PRECISIONS)}")
    return precision


@contextlib.contextmanager
def _cuda_math(precision: str):
    """TF32 on or off for this block only (the flags are process-wide). cuDNN's algorithm search stays as the
    caller set it: it did not speed the 512 px encoder up (bench/NOTES.md) and would vary the codes by run."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32, tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy that does not wait for the device's queue: from pageable memory a copy would (pinned first)."""
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


class _PreQuant(nn.Module):
    """encoder -> quant_conv: the part of the VQGAN that sees pixels."""

    def __init__(self, tokenizer: Any):
        super().__init__()
        self.encoder, self.quant_conv = copy.deepcopy(tokenizer.encoder), copy.deepcopy(tokenizer.quant_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))


class ImageBatchEncoder:
    """uint8 images (B, 3, H, W) -> int64 codes (B, h*w) on `device`, with a VQGAN `ImageTokenizer`'s weights.

    The pixels are mapped exactly as `ImageTokenizer.encode` maps them (x / 255 * 2 - 1 in float32), and the
    codes come from the tokenizer's own quantizer. Images per call: `batch_size`, else as many as fit
    CUDA_BATCH_PIXELS / CPU_BATCH_PIXELS. compile=True pads a call to that or to a power of two, so a few
    graphs serve each image size.
    """

    def __init__(self, tokenizer: Any, device: str | torch.device = "cpu", precision: str = DEFAULT_IMAGE_PRECISION,
                 compile: bool = False, channels_last: bool = True, batch_size: int | None = None):
        self.device = resolve_device(device)
        self.precision = check_precision(precision) if self.device.type == "cuda" else "fp32"
        self.channels_last = channels_last and self.device.type == "cuda"
        # Images per call: batch_size, else by pixels (on the CPU, float32 activations of one 512 px image are
        # ~130 MB per layer; on CUDA, small images need big batches to outrun kernel launches).
        self.batch_size = batch_size
        self.max_pixels = CUDA_BATCH_PIXELS if self.device.type == "cuda" else CPU_BATCH_PIXELS
        self.pre_quant = _PreQuant(tokenizer).to(self.device).eval().requires_grad_(False)
        self.quantize = copy.deepcopy(tokenizer.quantize).to(self.device).eval().requires_grad_(False)
        if self.channels_last:
            self.pre_quant.to(memory_format=torch.channels_last)
        self.compiled = compile
        self.forward = torch.compile(self.pre_quant, dynamic=False) if compile else self.pre_quant
        self.factor = tokenizer.downsample_factor

    def images_per_call(self, height: int, width: int) -> int:
        by_pixels = max(1, self.max_pixels // (height * width))
        if self.batch_size is None:
            return by_pixels
        return self.batch_size if self.device.type == "cuda" else min(self.batch_size, by_pixels)

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cuda", torch.bfloat16) if self.precision == "bf16" else contextlib.nullcontext()
        with autocast:
            return self.forward(x).float()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.factor or width % self.factor:
            raise ValueError(f"image size {height}x{width} is not a multiple of the VQGAN's downsampling factor "
                             f"{self.factor}")
        math = _cuda_math(self.precision) if self.device.type == "cuda" else contextlib.nullcontext()
        out = []
        with math:
            per_call = self.images_per_call(height, width)
            for batch in images.split(per_call):
                n = batch.shape[0]
                if self.compiled and n < per_call:  # a few batch sizes (powers of two), so a few graphs
                    padded = min(per_call, 1 << (n - 1).bit_length())
                    batch = torch.cat([batch, batch.new_zeros(padded - n, *batch.shape[1:])])
                x = _to_device(batch, self.device).float() / 255 * 2 - 1
                codes = self.quantize(self._latents(x))[2][2]
                out.append(codes.view(batch.shape[0], -1)[:n])
        return torch.cat(out)


class SpeechBatchEncoder:
    """Normalised unit features (N, unit_dim) float32 -> the nearest codebook entry of each, (N,) int64."""

    def __init__(self, tokenizer: Any, device: str | torch.device = "cpu"):
        self.device = resolve_device(device)
        self.codebook = tokenizer.codebook.to(self.device, torch.float32)
        self.assign = tokenizer.units_from_features

    @torch.no_grad()
    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if features.numel() == 0:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        math = _cuda_math("fp32") if self.device.type == "cuda" else contextlib.nullcontext()
        with math:
            return self.assign(_to_device(features, self.device), self.codebook)


IMAGE_BATCH_NEEDS = ("encoder", "quant_conv", "quantize", "downsample_factor")
SPEECH_BATCH_NEEDS = ("features", "units_from_features", "codebook")


def batches_images(tokenizer: Any) -> bool:
    """Whether `tokenizer` is a VQGAN whose encoder can run in batches (else prepare encodes one at a time)."""
    return tokenizer is not None and all(hasattr(tokenizer, n) for n in IMAGE_BATCH_NEEDS)


def batches_speech(tokenizer: Any) -> bool:
    return tokenizer is not None and all(hasattr(tokenizer, n) for n in SPEECH_BATCH_NEEDS)
