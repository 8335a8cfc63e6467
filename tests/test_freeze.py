"""train.freeze: frozen towers, rows and parameters come out of training bit for bit as they went in."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from mot.config import ConfigError, TrainConfig, load_config
from mot.grow import read_source, upcycle, write_derived
from mot.model import MoTTransformer
from mot.train.freeze import Freezer, frozen_parts
from mot.train.optim import build_optimizer
from mot.train.trainer import Trainer, train
from tests.conftest import tiny_config
from tests.runs import make_shards, run_config

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("freeze") / "shards")


def _initial(cfg) -> dict[str, torch.Tensor]:
    torch.manual_seed(cfg.train.seed)  # the trainer builds its model right after the same seeding
    return {k: v.detach().clone() for k, v in MoTTransformer(cfg.model).state_dict().items()}


@pytest.mark.usefixtures("fresh_accelerator_state")
@pytest.mark.parametrize("mode", ["fp32", "bf16 master weights, accumulated in backward"])
def test_frozen_parts_stay_bit_identical_and_get_no_optimizer_state(shards, tmp_path, mode):
    kw = dict(precision="bf16", master_weights=True, micro_batch_size=2) if mode.startswith("bf16") else {}
    cfg = run_config(shards, tmp_path, steps=4, freeze=["tower:text", "embed:text", "final_norm.*"], **kw)
    before = _initial(cfg)
    trainer = Trainer(cfg, progress=False)
    result = trainer.fit()
    after = load_file(result.checkpoint / "model.safetensors")
    text, image = trainer.state.vocab["text"], trainer.state.vocab["image"]
    for name, old in before.items():
        if old.shape[0] == 3 and "blocks" in name:  # one slice per modality: text frozen, image trained
            assert torch.equal(after[name][0], old[0]), name
            assert not torch.equal(after[name][1], old[1]), name
    for name in ("embed.weight", "head.weight"):
        assert torch.equal(after[name][text.start : text.stop], old_rows := before[name][text.start : text.stop])
        assert old_rows.abs().sum() > 0
        assert not torch.equal(after[name][image.start : image.stop], before[name][image.start : image.stop])
    assert torch.equal(after["final_norm.weight"], before["final_norm.weight"])
    frozen = trainer.state.model.final_norm.weight
    optimizer = trainer.state.inner_optimizer
    assert not frozen.requires_grad and frozen.grad is None and frozen not in optimizer.state
    assert all(frozen is not p for g in optimizer.param_groups for p in g["params"])


def test_weight_decay_reaches_the_trainable_rows_only():
    """All gradients zero: AdamW's update is 0 and only its decay moves weights, p * (1 - lr * wd), on every
    trainable row (of a partly frozen parameter too) and on no frozen one."""
    cfg = tiny_config()
    model = MoTTransformer(cfg)
    freezer = Freezer(cfg, model, ["tower:text", "embed:text"])
    train_cfg = TrainConfig(lr=0.1, weight_decay=0.5)
    optimizer = build_optimizer(model, train_cfg, freezer=freezer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # masked to zero on the frozen rows below; the rest zeroed by hand
    freezer.mask_gradients(optimizer)
    assert model.head.weight.grad[model.vocab["text"].start].abs().sum() == 0
    for p in model.parameters():
        p.grad.zero_()
    freezer.decay(optimizer)
    optimizer.step()
    factor = 1 - 0.1 * 0.5
    qkv, head = "blocks.0.attn.qkv.weight", "head.weight"
    text = model.vocab["text"]
    assert torch.equal(model.get_parameter(qkv)[0], before[qkv][0])
    assert torch.equal(model.get_parameter(qkv)[1], before[qkv][1] * factor)
    assert torch.equal(model.head.weight[text.start : text.stop], before[head][text.start : text.stop])
    assert torch.equal(model.head.weight[text.stop :], before[head][text.stop :] * factor)
    assert torch.equal(model.embed.weight, before["embed.weight"])  # embeddings are never decayed


def test_freeze_entries_are_checked(tmp_path):
    model = MoTTransformer(tiny_config())
    with pytest.raises(ConfigError, match="names no modality"):
        frozen_parts(tiny_config(), model, ["tower:video"])
    with pytest.raises(ConfigError, match="matches no parameter"):
        frozen_parts(tiny_config(), model, ["blocks.9.*"])
    dense = tiny_config(untie=[])
    with pytest.raises(ConfigError, match="dense model"):
        frozen_parts(dense, MoTTransformer(dense), ["tower:text"])
    whole, partial = frozen_parts(tiny_config(), model, ["blocks.1.*", "embed:speech"])
    assert "blocks.1.attn.qkv.weight" in whole and all(n.startswith("blocks.1.") for n in whole)
    assert {f.name for f in partial} == {"embed.weight", "head.weight"}


def test_lmfusion_recipe_trains_image_towers_around_a_frozen_pretrained_text_tower(shards, tmp_path):
    """The recipe's freeze and untie on the tiny corpus: a dense model trained, upcycled, then trained on."""
    recipe = load_config(REPO / "recipes" / "lmfusion_demo.toml")
    assert recipe.train.freeze and recipe.model.untie
    dense = run_config(shards, tmp_path, steps=2, checkpoint_every=2)
    dense = dataclasses.replace(dense, name="dense", model=dataclasses.replace(dense.model, untie=[]))
    pretrained = train(dense, progress=False)
    source = read_source(pretrained.run_dir)
    cfg, state, optimizer = upcycle(source, recipe.model.untie)
    init = write_derived(tmp_path / "init", source, cfg, state, {}, "upcycle", {})
    lmfusion = run_config(shards, tmp_path, steps=3, freeze=recipe.train.freeze)
    lmfusion = dataclasses.replace(lmfusion, name="lmfusion", model=cfg.model)
    result = train(lmfusion, progress=False, init_from=str(init))
    start, end = load_file(init / "model.safetensors"), load_file(result.checkpoint / "model.safetensors")
    qkv = "blocks.0.attn.qkv.weight"
    assert torch.equal(end[qkv][0], start[qkv][0])  # the text tower, as pretrained
    assert not torch.equal(end[qkv][1], start[qkv][1])  # the image tower learns


def test_resuming_with_another_freeze_is_refused(shards, tmp_path):
    cfg = run_config(shards, tmp_path, steps=4, checkpoint_every=2, freeze=["tower:text"])
    Trainer(cfg, progress=False).fit(until=2)
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, freeze=["tower:image"]))
    with pytest.raises(ConfigError, match="it was trained with \\['tower:text'\\]"):
        train(changed, resume=True, progress=False)
    assert train(cfg, resume=True, progress=False).step == 4  # the same freeze resumes
