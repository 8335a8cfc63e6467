"""train.cuda_graph on CUDA: each micro-batch's forward and backward captured once and replayed must train as
the eager compiled step does (bf16, master weights), for MoT and dense, with and without gradient accumulation,
and with the per-tower GEMMs whose backward adds into fp32 sums (the capture's warm-up must not leave its
gradients there)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mot.train.trainer import Trainer
from tests.conftest import tiny_config
from tests.runs import make_shards, run_config

STEPS = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def _run(shards, out, graph: bool, untie, kernels: str, micro: int):
    cfg = run_config(shards, out, seq_len=128, batch_size=8, micro_batch_size=micro, steps=STEPS, compile=True,
                     cuda_graph=graph, checkpoint_every=0, eval_every=0)
    model = tiny_config(dim=64, n_heads=4, ffn_dim=128, max_seq_len=128, untie=untie, kernels=kernels)
    trainer = Trainer(dataclasses.replace(cfg, model=model), progress=False)
    losses = [trainer.update().weighted for _ in range(STEPS)]
    return trainer, losses


@pytest.mark.parametrize(("untie", "kernels", "micro", "same_kernels"), [
    (["attn", "ffn", "norm"], "auto", 4, True),  # MoT, 2 micro-batches per step: grouped GEMMs in both
    (["attn", "ffn", "norm"], "auto", 8, True),  # one micro-batch per step
    ([], "per_tower", 4, True),  # dense: its backward adds into the master weights' fp32 sums
    (["attn", "ffn", "norm"], "per_tower", 4, False),  # eager: per-tower GEMMs on host counts; the graph: grouped
])
def test_a_cuda_graph_step_trains_as_the_eager_compiled_step(shards, tmp_path, fresh_accelerator_state, untie,
                                                              kernels, micro, same_kernels):
    eager, eager_losses = _run(shards, tmp_path / "eager", False, untie, kernels, micro)
    graph, graph_losses = _run(shards, tmp_path / "graph", True, untie, kernels, micro)
    state = graph.state
    assert isinstance(state.graph.graph, torch.cuda.CUDAGraph)
    assert state.graph.replays == STEPS * state.accum
    assert state.master_weights and eager.state.master_weights
    difference = np.abs(np.array(graph_losses) - np.array(eager_losses)).max()
    print(f"\nuntie={untie} kernels={kernels} accum={state.accum}: losses {np.round(graph_losses, 4).tolist()}, "
          f"max |graph - eager| {difference:.2e}")
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=1e-3 if same_kernels else 5e-3)
    assert graph_losses[-1] < graph_losses[0] - 0.1  # it learns
    if not same_kernels:  # bf16 roundings differ, and AdamW's first steps magnify them in the weights
        return
    masters = lambda t: {name: t.state.inner_optimizer.masters.get(p, p)
                         for name, p in t.state.model.named_parameters()}
    for (name, a), b in zip(masters(eager).items(), masters(graph).values(), strict=True):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("graph", [False, True])
def test_every_token_reaches_its_own_tower_on_the_gpu_path(shards, tmp_path, fresh_accelerator_state, graph):
    """train.check_routing on CUDA: host counts against the device's, and the route the step builds (host counts
    eager, the device's own under a graph) checked per micro-batch; it must find nothing on real batches."""
    cfg = run_config(shards, tmp_path / "r", seq_len=128, batch_size=8, micro_batch_size=4, steps=3, compile=True,
                     cuda_graph=graph, check_routing=True, checkpoint_every=0, eval_every=0)
    model = tiny_config(dim=64, n_heads=4, ffn_dim=128, max_seq_len=128, untie=["attn", "ffn", "norm"])
    trainer = Trainer(dataclasses.replace(cfg, model=model), progress=False)
    for _ in range(3):
        trainer.update()
