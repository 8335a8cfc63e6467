"""The processes of one `mot prepare` under torchrun / accelerate launch: who I am, and the few collectives
prepare needs (one process checks the folder first, everyone's shard metadata to process 0).

Collectives go over gloo (CPU tensors), in a group of its own when torch.distributed is already set up with
another backend; outside torchrun (WORLD_SIZE unset or 1) there is one process and nothing to set up.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

# One process may prepare far more than another before they meet again (an uneven source).
TIMEOUT = timedelta(hours=24)


@dataclass
class ProcessGroup:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    group: Any = None  # a gloo group when torch.distributed was set up by someone else
    owned: bool = False  # we set up torch.distributed, so we take it down

    @classmethod
    def from_environment(cls) -> ProcessGroup:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        import torch.distributed as dist

        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("gloo", timeout=TIMEOUT)  # env:// (RANK, WORLD_SIZE, MASTER_ADDR/PORT)
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), group, owned)

    def device(self, device: str | None) -> str | None:
        """With several processes, "auto" and "cuda" mean this process's GPU, cuda:LOCAL_RANK."""
        if self.size > 1 and device in ("auto", None, "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def on_first(self, fn: Callable[[], None], error: type[Exception]) -> None:
        """Process 0 runs fn while the others wait; if it raises, every process raises (the others an `error`
        with its message, or a RuntimeError for another kind of exception)."""
        if self.size == 1:
            fn()
            return
        import torch.distributed as dist

        message: list = [None]
        failure = None
        if self.rank == 0:
            try:
                fn()
            except Exception as err:  # every failure must reach the others, or they wait for the timeout
                failure, message = err, [(isinstance(err, error), f"{type(err).__name__}: {err}")]
        dist.broadcast_object_list(message, src=0, group=self.group)
        if failure is not None:
            raise failure
        if message[0] is not None:
            expected, text = message[0]
            raise (error if expected else RuntimeError)(f"process 0 failed: {text}")

    def gather(self, obj: Any) -> list[Any]:
        """obj of every process, by rank (all processes get the list)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False
