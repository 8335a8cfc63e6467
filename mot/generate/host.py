"""Host values to the GPU without a host sync.

`torch.tensor(values, device="cuda")` copies from pageable memory, and CUDA makes such a copy wait for all work
queued on the stream: every small tensor a decoding step builds would stall the host until the GPU caught up.
A copy from pinned memory with `non_blocking=True` is queued like a kernel instead; torch's pinned-memory cache
keeps the host buffer until the copy has run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype)` on `device`; queued on the current stream where that is a GPU."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
