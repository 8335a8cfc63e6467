"""How well a speech unit tokenizer's units reconstruct the audio, in dB of log-mel."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mot.tokenize.base import TokenizerError
from mot.tokenize.speech import SpeechTokenizer


def mel_reconstruction_error(tokenizer: SpeechTokenizer, waveforms: Iterable) -> dict:
    """How far the units are from the audio, in dB of log-mel (20 log10 magnitude mel, floored at floor_db).

    quantization_mae_db: mean |log-mel(x) - codebook frames of encode(x)| (the codebook's error);
    end_to_end_mae_db: mean |log-mel(x) - log-mel(decode(encode(x)))| (codebook + mel inversion);
    inversion_mae_db: the same through mel inversion of the unquantized log-mel (Griffin-Lim's own error,
    the floor for end_to_end). *_nmse: mean squared error / variance of log-mel(x) (unitless).
    Averages are over every frame and mel bin of all waveforms (tensors (T,) or file paths). Speech
    (dense spectra) inverts well; a pure tone does not: inversion spreads its energy into bands that
    were at floor_db, tens of dB off.
    """
    sums = {"quantization": 0.0, "end_to_end": 0.0, "inversion": 0.0}
    squares = dict.fromkeys(sums, 0.0)
    refs, used, n = [], torch.zeros(tokenizer.vocab_size, dtype=torch.bool), 0
    for item in waveforms:
        ref = tokenizer.log_mel(item)
        units = tokenizer.units_from_log_mel(ref)
        used[units] = True
        quantized = tokenizer.units_to_log_mel(units)
        outputs = {"quantization": quantized,
                   "end_to_end": tokenizer.log_mel(tokenizer.log_mel_to_waveform(quantized)),
                   "inversion": tokenizer.log_mel(tokenizer.log_mel_to_waveform(ref))}
        for key, out in outputs.items():
            sums[key] += float((out - ref).abs().sum())
            squares[key] += float((out - ref).pow(2).sum())
        refs.append(ref.flatten())
        n += ref.numel()
    if not n:
        raise TokenizerError("mel_reconstruction_error: no waveforms given")
    variance = float(torch.cat(refs).var())
    result = {f"{key}_mae_db": sums[key] / n for key in sums}
    result |= {f"{key}_nmse": squares[key] / n / variance for key in sums}
    result |= {"frames": n // tokenizer.config.n_mels, "codebook_usage": float(used.float().mean())}
    return result
