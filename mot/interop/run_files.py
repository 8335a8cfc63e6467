"""What an imported run folder holds besides a checkpoint, and how a derived run keeps it.

    RUN/chameleon_vocab.json          the id permutation between Chameleon's vocabulary and mot's, and the
                                      source's config.json (mot import-hf writes it, mot export-hf reads it)
    RUN/chameleon_vqvae.safetensors   the VQVAE's tensors as released, written back on export
"""

from __future__ import annotations

import shutil
from pathlib import Path

VOCAB_FILE = "chameleon_vocab.json"
VQVAE_FILE = "chameleon_vqvae.safetensors"


def carry_interop_files(source_run: Path, target_run: Path) -> None:
    """A run derived from an imported one (mot upcycle, mot train --init-from) keeps its vocabulary mapping and
    VQVAE tensors, so that its dense form still exports with Chameleon's ids."""
    for name in (VOCAB_FILE, VQVAE_FILE):
        if (source_run / name).is_file() and not (target_run / name).exists():
            target_run.mkdir(parents=True, exist_ok=True)
            shutil.copy(source_run / name, target_run / name)
