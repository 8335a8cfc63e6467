"""One micro-batch's forward and backward as a CUDA graph (`train.cuda_graph`): a small model's step without
the host's cost per kernel.

    graph = MicroBatchGraph(state)          # captured at its first call
    loss_sum, count = graph(batch)          # a host batch, copied into the graph's inputs; then replayed
    # the micro-batch's gradients are now in .grad, added to what was there, as after loss.backward()

A small model's step is bound by the host: each of the thousands of kernels that the blocks, the loss and
autograd launch per micro-batch costs more host time than GPU time (bench/NOTES.md). Replaying the captured
graph launches them all at once.

What makes the capture valid:
- fixed shapes: every micro-batch is (micro, seq_len); the route is computed on the device from the modality
  ids (no host counts, so one graph serves every mix of towers: the grouped kernel runs the projections);
- nothing reads the GPU from the host inside: compiled blocks and loss (config_checks requires train.compile),
  one process (no gradient all-reduce), autoregressive objectives only (diffusion spans vary in number);
- warm-up first, on a side stream: compilation and autotuning must not happen while capturing.

Gradients: the captured backward writes them into buffers of the graph's memory pool, which every replay
overwrites. After a replay each is copied into a fresh `.grad` (or added to the one there), so gradient
accumulation, master weights' fp32 stash, the clip and freezing see what eager training gives them. fp32 sums
that the backward adds into (master weights' accumulate_in_backward) are fixed buffers: replays add into them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from mot.config import ConfigError
from mot.data.loader import PackedBatch
from mot.model.transformer import split_kernel_projections


class _EagerReplay:
    """Stands in for a CUDA graph where none can be captured (the CPU tests): replay re-runs the function."""

    def __init__(self, fn: Callable[[], None]):
        self.fn = fn

    def replay(self) -> None:
        self.fn()


class MicroBatchGraph:
    """Forward and backward of one (micro, seq_len) micro-batch, captured once and replayed for each batch.

    state: the TrainState (model, objective, accelerator, the step's shape). capture=False runs the same
    plumbing with the function re-run at each replay instead of a graph (tests on the CPU)."""

    def __init__(self, state, capture: bool = True, warmup: int = 2):
        self.state, self.capture, self.warmup = state, capture, warmup
        self.params = [p for p in state.model.parameters() if p.requires_grad]
        self.inputs: PackedBatch | None = None  # the graph's input buffers on the device
        self.loss_sum = self.count = None  # its outputs
        self.grads: list[torch.Tensor | None] = []  # the buffers its backward writes, per parameter
        self.graph = None
        self.replays = 0
        if capture:
            self._check_kernels()

    def _check_kernels(self) -> None:
        """Every projection of several towers must run on the grouped kernel: the split kernel reads the slice
        sizes back from the GPU, which fails inside a capture (after the compile, so say it now)."""
        s = self.state
        model = s.accelerator.unwrap_model(s.model)
        dtype = torch.bfloat16 if s.accelerator.mixed_precision == "bf16" else torch.float32
        split = split_kernel_projections(model, dtype, s.accelerator.device)
        if split:
            name, shape = split[0]
            raise ConfigError(
                f"{s.where}: train.cuda_graph: {name} would run its towers on the split kernel, which reads "
                "their sizes back from the GPU and cannot be captured; the grouped kernel needs bf16 "
                "precision on a Hopper or newer GPU, model.kernels 'auto' or 'grouped', and dimensions "
                f"that are multiples of 8 (here {dtype}, model.kernels {model.kernels.matmul!r}, {shape})")

    # ------------------------------------------------------------ capture

    def _forward_backward(self) -> None:
        s = self.state
        predictions = s.accum * s.micro * (s.cfg.train.seq_len - 1)
        mask = s.objective.mask(self.inputs, s.flex)
        loss_sum, count = s.objective.losses(s.model, self.inputs, mask)
        s.accelerator.backward(s.objective.backward_scalar(loss_sum, count, predictions, s.accum))
        # Detached: kept, they must not keep this pass's autograd graph (and its AccumulateGrad nodes) alive.
        self.loss_sum, self.count = loss_sum.detach(), count.detach()

    def _capture(self, batch: PackedBatch) -> None:
        s, device = self.state, self.state.accelerator.device
        self.inputs = PackedBatch(*(t.to(device) for t in (batch.tokens, batch.modality, batch.positions,
                                                           batch.document_ids)))
        held = [p.grad for p in self.params]  # none at the start of a step; kept safe all the same
        backward_sums = getattr(s.inner_optimizer, "backward_sums", {})
        sums_before = [t.clone() for t in backward_sums.values()]
        for p in self.params:
            p.grad = None
        side = torch.cuda.Stream() if self.capture else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for _ in range(self.warmup):  # compiles and autotunes here, not while capturing
                self._forward_backward()
                for p in self.params:
                    p.grad = None
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._forward_backward()
            self.grads = [p.grad for p in self.params]
        else:
            self.graph = _EagerReplay(self._rerun)
        for total, before in zip(backward_sums.values(), sums_before, strict=True):
            total.copy_(before)  # the warm-up's backward added into them
        for p, grad in zip(self.params, held, strict=True):
            p.grad = grad

    def _rerun(self) -> None:
        """The function again, its gradients copied into the same buffers every time, as a graph's replay
        overwrites its own."""
        for p in self.params:
            p.grad = None
        self._forward_backward()
        fresh = [p.grad for p in self.params]
        if not self.grads:
            self.grads = [None if g is None else torch.empty_like(g) for g in fresh]
        for buffer, grad in zip(self.grads, fresh, strict=True):
            if grad is not None:
                buffer.copy_(grad)

    # ------------------------------------------------------------ replay

    def __call__(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of a host (or device) batch of the captured shape; the per-modality loss sums and
        counts, and its gradients added into `.grad`."""
        if self.graph is None:
            self._capture(batch)
        expected = tuple(self.inputs.tokens.shape)
        if tuple(batch.tokens.shape) != expected:
            raise ValueError(f"train.cuda_graph: a micro-batch of shape {tuple(batch.tokens.shape)}, the graph was "
                             f"captured for {expected}")
        for buffer, values in zip((self.inputs.tokens, self.inputs.modality, self.inputs.positions,
                                   self.inputs.document_ids),
                                  (batch.tokens, batch.modality, batch.positions, batch.document_ids), strict=True):
            buffer.copy_(values, non_blocking=True)
        held = [p.grad for p in self.params]
        self.graph.replay()
        self.replays += 1
        fresh, add_to, added = [], [], []
        for p, before, grad in zip(self.params, held, self.grads, strict=True):
            p.grad = before
            if grad is None:
                continue
            if before is None:
                fresh.append((p, grad))
            else:
                add_to.append(before)
                added.append(grad)
        if add_to:
            torch._foreach_add_(add_to, added)
        for p, grad in fresh:  # a copy: the next replay overwrites the graph's buffer
            p.grad = grad.clone()
        return self.loss_sum.detach().clone(), self.count.detach().clone()
