"""train.cuda_graph's plumbing on the CPU: MicroBatchGraph with its function re-run in place of a CUDA graph
(capture=False; its gradients land in the same buffers at every replay, as a graph's do) must train exactly as
the eager step does. The capture itself is tested on the GPU (tests/gpu/test_graphed_step_gpu.py)."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from mot.config import ConfigError, config_from_dict, config_to_dict
from mot.train.graphed_step import MicroBatchGraph
from mot.train.trainer import Trainer
from tests.runs import make_shards, run_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def _trained(shards, out, graph: bool, steps: int = 3, **train):
    trainer = Trainer(run_config(shards, out, steps=steps, checkpoint_every=0, eval_every=0, **train),
                      progress=False)
    if graph:
        trainer.state.graph = MicroBatchGraph(trainer.state, capture=False)
    losses = [trainer.update().weighted for _ in range(steps)]
    return trainer, losses


@pytest.mark.parametrize("micro_batch_size", [4, 2, 1])  # 1, 2 and 4 micro-batches per step
def test_replayed_micro_batches_train_exactly_as_the_eager_step(shards, tmp_path, micro_batch_size):
    eager, eager_losses = _trained(shards, tmp_path / "eager", False, micro_batch_size=micro_batch_size)
    graph, graph_losses = _trained(shards, tmp_path / "graph", True, micro_batch_size=micro_batch_size)
    assert graph.state.graph.replays == 3 * (4 // micro_batch_size)
    assert graph_losses == eager_losses
    for (name, a), b in zip(eager.state.model.named_parameters(), graph.state.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_micro_batch_of_another_shape_is_refused(shards, tmp_path):
    trainer, _ = _trained(shards, tmp_path / "g", True, steps=1)
    batch = next(trainer.state.train_batches)
    half = type(batch)(*(t[:, :16] for t in (batch.tokens, batch.modality, batch.positions, batch.document_ids)))
    with pytest.raises(ValueError, match=r"captured for \(4, 32\)"):
        trainer.state.graph(half)


def test_cuda_graph_needs_compiled_blocks(shards, tmp_path):
    cfg = run_config(shards, tmp_path / "g", cuda_graph=True)
    with pytest.raises(ConfigError, match="train.cuda_graph.*needs train.compile"):
        config_from_dict(config_to_dict(cfg), where="recipe")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without a CUDA device")
def test_cuda_graph_is_refused_without_a_cuda_device(shards, tmp_path):
    cfg = run_config(shards, tmp_path / "g", cuda_graph=True, compile=True)
    with pytest.raises(ConfigError, match="train.cuda_graph runs on one CUDA device"):
        Trainer(config_from_dict(config_to_dict(cfg), where="recipe"), progress=False)


# ---------------------------------------------------------------- the prefetching loader (on with train.cuda_graph)


def test_prefetched_batches_and_positions_are_the_loaders_own(shards, tmp_path):
    from mot.train.data import Prefetched, RankSlice

    plain = Trainer(run_config(shards, tmp_path / "a"), progress=False).state.train_batches
    ahead = Prefetched(RankSlice(Trainer(run_config(shards, tmp_path / "b"), progress=False).state.train_loader, 0, 1),
                       depth=3)
    for _ in range(5):
        a, b = next(plain), next(ahead)
        for x, y in zip((a.tokens, a.modality, a.positions, a.document_ids),
                        (b.tokens, b.modality, b.positions, b.document_ids), strict=True):
            assert torch.equal(x, y)
        assert ahead.state_dict() == plain.state_dict()  # though the thread has drawn further
    ahead.close()
    assert ahead.batches.state_dict() == plain.state_dict()  # the loader put back where the steps left it
    a, b = next(plain), next(ahead)  # and it goes on from there
    assert torch.equal(a.tokens, b.tokens)
    ahead.close()


def test_a_run_with_prefetching_resumes_on_the_uninterrupted_curve(shards, tmp_path):
    """Prefetching as build_state sets it up: wrapped first, then a checkpoint loaded through it."""
    from mot import runs
    from mot.train.data import Prefetched
    from mot.train.state_io import load_state

    def trainer(out):
        t = Trainer(run_config(shards, out, steps=6, checkpoint_every=3, eval_every=0), progress=False)
        t.state.train_batches = Prefetched(t.state.train_batches)
        return t

    whole = trainer(tmp_path / "whole").fit()
    first = trainer(tmp_path / "parts")
    first.fit(until=3)
    for _ in range(2):  # the thread runs ahead of what the steps used
        next(first.state.train_batches)
    resumed = trainer(tmp_path / "resumed")
    next(resumed.state.train_batches)  # its thread too is ahead when the checkpoint comes in
    load_state(resumed.state, runs.latest_checkpoint(tmp_path / "parts" / "tiny" / "checkpoints"))
    rest = resumed.fit()
    assert first.state.step == 3 and rest.step == 6
    assert whole.losses[3:] == rest.losses


def test_a_loader_error_reaches_the_step(shards, tmp_path):
    from mot.train.data import Prefetched

    class Broken:
        loader = None

        def __next__(self):
            raise ValueError("shard-000003: bad offsets")

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    batches = Prefetched(Broken())
    with concurrent.futures.ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="bad offsets"):
        pool.submit(next, batches).result(timeout=30)  # raised, not lost in the thread (a hang)


@pytest.mark.parametrize(("untie", "kernels", "refused"), [
    (["attn", "ffn", "norm"], "auto", True),  # fp32 on the CPU: the split kernel, which a capture cannot hold
    (["attn", "ffn", "norm"], "split", True),
    (["attn", "ffn", "norm"], "grouped", False),
    ([], "auto", False),  # dense: no towers to split
])
def test_a_model_whose_towers_would_split_is_refused_before_any_capture(shards, tmp_path, untie, kernels, refused):
    import dataclasses

    cfg = run_config(shards, tmp_path / "g")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, untie=untie, kernels=kernels))
    graph = MicroBatchGraph(Trainer(cfg, progress=False).state, capture=False)
    if refused:
        with pytest.raises(ConfigError, match=r"train.cuda_graph: blocks\.0\.attn\.qkv would run its towers on the "
                                              r"split kernel.*model.kernels '" + kernels):
            graph._check_kernels()
    else:
        graph._check_kernels()
