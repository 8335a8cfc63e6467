"""train.check_routing: a debug run's per-micro-batch check that every token reaches its own tower."""

from __future__ import annotations

import dataclasses

import pytest

from mot.train.routing_check import RoutingCheckError
from mot.train.trainer import Trainer
from tests.runs import make_shards, run_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def _trainer(shards, out, **train):
    return Trainer(run_config(shards, out, steps=3, micro_batch_size=2, checkpoint_every=0, eval_every=0, **train),
                   progress=False)


def test_a_checked_run_trains_exactly_as_an_unchecked_one(shards, tmp_path):
    checked, plain = _trainer(shards, tmp_path / "a", check_routing=True), _trainer(shards, tmp_path / "b")
    assert [checked.update().weighted for _ in range(3)] == [plain.update().weighted for _ in range(3)]


def _spoiled(trainer, spoil):
    """The trainer's next micro-batch passed through spoil(batch) -> batch."""
    batches = trainer.state.train_batches
    draw = batches.__next__
    trainer.state.train_batches = type("Spoiled", (), {"__next__": lambda self: spoil(draw()),
                                                       "__iter__": lambda self: self})()


def test_a_token_with_another_towers_modality_id_is_caught(shards, tmp_path):
    trainer = _trainer(shards, tmp_path / "a", check_routing=True)

    def spoil(batch):
        modality = batch.modality.clone()
        modality[0, 3] = (modality[0, 3] + 1) % 3
        return dataclasses.replace(batch, modality=modality)

    _spoiled(trainer, spoil)
    with pytest.raises(RoutingCheckError, match=r"step 1, micro-batch 0: 1 token\(s\) carry a modality id"):
        trainer.update()


def test_host_counts_other_than_the_devices_are_caught(shards, tmp_path, monkeypatch):
    from mot.data import loader

    trainer = _trainer(shards, tmp_path / "a", check_routing=True)
    real = loader.count_towers
    monkeypatch.setattr(loader, "count_towers", lambda modality, n: (lambda c: (c[0] + 1, c[1] - 1, *c[2:]))(
        real(modality, n)))
    with pytest.raises(RoutingCheckError, match="host tower counts .* but the device holds"):
        trainer.update()


def test_a_route_that_sends_a_token_to_another_tower_is_caught(shards, tmp_path, monkeypatch):
    trainer = _trainer(shards, tmp_path / "a", check_routing=True)
    model = trainer.state.model
    route_of = model.route

    def misrouted(modality, tower_counts=None):
        route = route_of(modality, tower_counts)
        order = route.order.clone()
        order[[0, -1]] = order[[-1, 0]]  # the first and last sorted rows swap tokens (different towers)
        return dataclasses.replace(route, order=order)

    monkeypatch.setattr(model, "route", misrouted)
    with pytest.raises(RoutingCheckError, match="a tower's slice of the sorted rows holds another tower's tokens"):
        trainer.update()
