"""A saved tokenizer folder -> the tokenizer of its modality (text BPE, VQGAN image codes, speech units)."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(modality: str, folder: str | Path):
    """The tokenizer saved in `folder` for `modality` ("text", "image" in eval mode, else speech)."""
    if modality == "text":
        from mot.tokenize.text import TextTokenizer

        return TextTokenizer.load(folder)
    if modality == "image":
        from mot.tokenize.image import ImageTokenizer

        return ImageTokenizer.load(folder).eval()
    from mot.tokenize.speech import SpeechTokenizer

    return SpeechTokenizer.load(folder)
