"""FSDP2 gather policy over the micro-batches of one optimizer step.

By default FSDP2 all-gathers a block's weights for its forward, frees them, and gathers them again for its
backward: two all-gathers per block per micro-batch. Keeping the gathered (bf16) weights from the first
forward of a step to its last backward makes that one per optimizer step, for the memory of all blocks'
gathered weights on every GPU (2 bytes per parameter): bench/NOTES.md measures what it buys.
"""

from __future__ import annotations

from torch import nn


def keep_gathered(model: nn.Module, micro: int, accum: int) -> None:
    """Before micro-batch `micro` of `accum`: weights stay gathered through every forward, and through every
    backward but the step's last, which frees them. `model` is the fully_shard-ed root (an FSDPModule)."""
    model.set_reshard_after_forward(False)
    model.set_reshard_after_backward(micro == accum - 1)
