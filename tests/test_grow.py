"""Growing a trained model keeps its function: more Pattention tokens, dense -> MoT, a new modality; the CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from mot import grow as ops
from mot import runs
from mot.cli import main
from mot.config import DataConfig, RunConfig, TrainConfig, config_to_dict, load_config
from mot.data.synthetic import random_layout, tokens_for_layout
from mot.model import ModelInputs, MoTTransformer
from mot.train import checkpoint as ckpt
from mot.train.optim import build_optimizer
from mot.train.trainer import Trainer
from tests.conftest import randomize_norms, tiny_config
from tests.runs import make_shards, run_config


def _run_config(**model) -> RunConfig:
    model = {"projection": "pattention", "param_tokens": 8, **model}
    return RunConfig(name="src", model=tiny_config(**model), train=TrainConfig(seq_len=32, batch_size=2),
                     data=DataConfig())


def _checkpoint(folder: Path, cfg: RunConfig, seed: int = 0) -> Path:
    """A checkpoint as the trainer writes it: weights (norms randomised so towers differ) and one AdamW step."""
    torch.manual_seed(seed)
    model = MoTTransformer(cfg.model)
    randomize_norms(model, torch.Generator().manual_seed(seed))
    optimizer = build_optimizer(model, cfg.train)
    tokens = _tokens(model, list(range(cfg.model.n_modalities)), seed)
    model(ModelInputs(tokens)).logits.square().mean().backward()
    optimizer.step()
    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    meta = {"config": config_to_dict(cfg), "tokens_seen": 64, "wall_s": 1.0, "flops_seen": 1e6, "scheduler": {},
            "loader": {}, "python_rng": None, "tokenizers": ""}
    return ckpt.save_checkpoint(folder / "checkpoints", 3, model.state_dict(), state, meta, keep=1)


def _tokens(model: MoTTransformer, modalities: list[int], seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return tokens_for_layout(random_layout(2, 24, modalities, 6, generator), model.vocab, generator)


def _logits64(model: MoTTransformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.double()(ModelInputs(tokens)).logits


def _model(path: Path) -> MoTTransformer:
    model, _, _ = runs.load_for_inference(path)
    return model


# ---------------------------------------------------------------- grow


@pytest.mark.parametrize("modality", [None, "image"])
def test_grow_keeps_outputs_identical(modality, tmp_path):
    source = _checkpoint(tmp_path / "src", _run_config())
    src = ops.read_source(source)
    cfg, state, optimizer = ops.grow(src, 20, modality)
    path = ops.write_derived(tmp_path / "grown", src, cfg, state, optimizer, "grow", {})
    before, after = _model(source), _model(tmp_path / "grown")
    grown = [after.cfg.param_tokens_of("attn", m) for m in range(3)]
    assert grown == ([20, 20, 20] if modality is None else [8, 20, 8])
    assert after.cfg.param_tokens_tau == [8, 8, 8]
    tokens = _tokens(before, [0, 1, 2])
    torch.testing.assert_close(_logits64(after, tokens), _logits64(before, tokens), rtol=1e-12, atol=1e-12)
    qkv = after.blocks[0].attn.qkv
    assert torch.count_nonzero(qkv.keys[1, 8:20]) == 0 and torch.count_nonzero(qkv.values[1, 8:20]) > 0
    meta = runs.read_meta(path)
    assert meta["operation"] == "grow" and meta["derived_from"] == str(source) and meta["step"] == 3


def test_grow_maps_adam_moments_like_the_weights(tmp_path):
    src = ops.read_source(_checkpoint(tmp_path / "src", _run_config()))
    _, _, optimizer = ops.grow(src, 16)
    old = src.optimizer["state"]["blocks.1.ffn.proj.values"]
    new = optimizer["state"]["blocks.1.ffn.proj.values"]
    assert new["exp_avg_sq"].shape == (3, 64, 32)  # FFN: 4 x 16 tokens
    assert torch.equal(new["exp_avg_sq"][:, :32], old["exp_avg_sq"]) and not new["exp_avg_sq"][:, 32:].any()
    assert torch.equal(new["step"], old["step"])
    assert optimizer["param_groups"] == src.optimizer["param_groups"]


def test_grow_twice_keeps_the_first_tau(tmp_path):
    src = ops.read_source(_checkpoint(tmp_path / "src", _run_config()))
    cfg, _, _ = ops.grow(src, 12, "text")
    again = ops.grown_config(cfg, 16)
    assert again.model.param_tokens == 16 and again.model.param_tokens_tau == [8, 8, 8]


@pytest.mark.parametrize("kwargs, match", [
    ({"param_tokens": 8}, r"--param-tokens 8 is not more than the tokens already there \(text has 8, image"),
    ({"param_tokens": 4, "modality": "image"}, r"not more than .* \(image has 8\); growing only adds tokens"),
    ({"param_tokens": 16, "modality": "video"}, r"--modality 'video': no such modality; .*\['text', 'image'"),
])
def test_bad_grow_requests_say_why(kwargs, match, tmp_path):
    src = ops.read_source(_checkpoint(tmp_path / "src", _run_config()))
    with pytest.raises(ops.GrowError, match=match):
        ops.grow(src, **kwargs)


def test_grow_refuses_linear_and_shared_towers(tmp_path):
    linear = ops.read_source(_checkpoint(tmp_path / "linear", _run_config(projection="linear", param_tokens=0)))
    with pytest.raises(ops.GrowError, match=r"projections are linear .* --model.projection=pattention"):
        ops.grow(linear, 16)
    shared = ops.read_source(_checkpoint(tmp_path / "shared", _run_config(untie=["ffn", "norm"])))
    with pytest.raises(ops.GrowError, match=r"shared with the other modalities \(model.untie = \['ffn', 'norm'\]"):
        ops.grow(shared, 16, "text")


# ---------------------------------------------------------------- upcycle


@pytest.mark.parametrize("projection", ["linear", "pattention"])
@pytest.mark.parametrize("untie", [["attn", "ffn", "norm"], ["ffn"]])
def test_upcycled_dense_computes_what_dense_computes(projection, untie, tmp_path):
    cfg = _run_config(untie=[], projection=projection, param_tokens=8 if projection == "pattention" else 0,
                      qk_norm=True)
    source = _checkpoint(tmp_path / "dense", cfg)
    src = ops.read_source(source)
    new_cfg, state, optimizer = ops.upcycle(src, untie)
    ops.write_derived(tmp_path / "mot", src, new_cfg, state, optimizer, "upcycle", {"untie": untie})
    dense, mot = _model(source), _model(tmp_path / "mot")
    assert mot.cfg.untie == untie and not mot.cfg.is_dense
    towers = {n: p.shape[0] for n, p in mot.named_parameters() if n.startswith("blocks.0.")}
    assert towers["blocks.0.ffn_norm.weight"] == (3 if "norm" in untie else 1)
    tokens = _tokens(dense, [0, 1, 2])
    torch.testing.assert_close(_logits64(mot, tokens), _logits64(dense, tokens), rtol=1e-12, atol=1e-12)
    name = "blocks.0.ffn.proj.keys" if projection == "pattention" else "blocks.0.ffn.w13.weight"
    moment = optimizer["state"][name]["exp_avg"]
    assert moment.shape[0] == 3 and all(torch.equal(m, src.optimizer["state"][name]["exp_avg"][0]) for m in moment)


def test_upcycle_refuses_what_is_not_dense(tmp_path):
    mot = ops.read_source(_checkpoint(tmp_path / "mot", _run_config()))
    with pytest.raises(ops.GrowError, match=r"is already MoT \(model.untie = \['attn', 'ffn', 'norm'\]\); .* dense"):
        ops.upcycle(mot)
    one = _run_config(untie=[], modalities=tiny_config().modalities[:1])
    with pytest.raises(ops.GrowError, match=r"has one modality \(text\): .* \(mot add-modality\)"):
        ops.upcycle(ops.read_source(_checkpoint(tmp_path / "one", one)))
    dense = ops.read_source(_checkpoint(tmp_path / "dense", _run_config(untie=[])))
    with pytest.raises(ops.GrowError, match=r"--untie 'ffn,mlp': choose one or more of attn,ffn,norm"):
        ops.upcycle(dense, ["ffn", "mlp"])


# ---------------------------------------------------------------- add a modality


@pytest.mark.parametrize("variant", ["linear", "pattention per modality", "tied embeddings"])
def test_added_modality_leaves_the_old_ones_unchanged(variant, tmp_path):
    two = tiny_config().modalities[:2]
    model_kwargs = {
        "linear": {"projection": "linear", "param_tokens": 0},
        "pattention per modality": {"param_tokens_per_modality": [8, 12]},
        "tied embeddings": {"tie_embeddings": True},
    }[variant]
    source = _checkpoint(tmp_path / "src", _run_config(modalities=two, **model_kwargs))
    src = ops.read_source(source)
    cfg, state, optimizer = ops.add_modality(src, "speech", 100, "text")
    assert optimizer == {}
    ops.write_derived(tmp_path / "three", src, cfg, state, optimizer, "add-modality", {})
    old, new = _model(source), _model(tmp_path / "three")
    assert [m.name for m in new.cfg.modalities] == ["text", "image", "speech"]
    # The specials moved up by the new range: 40 + 24 = 64 -> 164.
    assert old.vocab.special_id("<boi>") == 64 + 3 and new.vocab.special_id("<boi>") == 164 + 3
    tokens = _tokens(old, [0, 1])
    tokens[:, ::5] = old.vocab.special_start + torch.arange(8).repeat(5)[: tokens[:, ::5].numel()].view(2, -1)
    old_ids, new_ids = ops.vocab_id_map(old.vocab, new.vocab)
    to_new = torch.arange(old.vocab.size)
    to_new[old_ids] = new_ids
    before, after = _logits64(old, tokens), _logits64(new, to_new[tokens])
    torch.testing.assert_close(after[..., new_ids], before[..., old_ids], rtol=1e-12, atol=1e-12)
    text, speech = new.tower_parameters(0), new.tower_parameters(2)
    assert speech and all(torch.equal(speech[k], text[k]) for k in text)
    if variant == "pattention per modality":
        assert new.cfg.param_tokens_per_modality == [8, 12, 8]
    tokens = tokens_for_layout(torch.full((1, 8), 2), new.vocab, torch.Generator())
    assert new(ModelInputs(tokens)).logits.shape == (1, 8, 192)


def test_add_modality_errors(tmp_path):
    src = ops.read_source(_checkpoint(tmp_path / "src", _run_config()))
    with pytest.raises(ops.GrowError, match=r"--name 'image': the checkpoint already has that modality"):
        ops.add_modality(src, "image", 10, "text")
    with pytest.raises(ops.GrowError, match=r"--from 'video': no such modality"):
        ops.add_modality(src, "depth", 10, "video")
    with pytest.raises(ops.GrowError, match=r"--vocab-size must be positive, got 0"):
        ops.add_modality(src, "depth", 0, "text")


# ---------------------------------------------------------------- loading, the CLI


def test_load_weights_into_checks_the_architecture(tmp_path):
    src = ops.read_source(_checkpoint(tmp_path / "src", _run_config()))
    cfg, state, optimizer = ops.grow(src, 16)
    ops.write_derived(tmp_path / "grown", src, cfg, state, optimizer, "grow", {})
    recipe = load_config(tmp_path / "grown" / "recipe.toml")
    model = MoTTransformer(recipe.model)
    meta = ops.load_weights_into(model, tmp_path / "grown")
    assert meta["operation"] == "grow" and torch.equal(model.blocks[0].attn.qkv.keys, state["blocks.0.attn.qkv.keys"])
    with pytest.raises(ops.GrowError, match=r"holds another model than the recipe's \(param_tokens: 16 .* vs 8"):
        ops.load_weights_into(MoTTransformer(src.cfg.model), tmp_path / "grown")


def test_cli_grow_upcycle_add_modality(tmp_path, capsys):
    dense = _checkpoint(tmp_path / "dense", _run_config(untie=[]))
    assert main(["upcycle", str(tmp_path / "dense"), "--untie", "attn,ffn", "--out", str(tmp_path / "mot")]) == 0
    assert main(["grow", str(tmp_path / "mot"), "--param-tokens", "16", "--out", str(tmp_path / "big")]) == 0
    assert main(["add-modality", str(tmp_path / "big"), "--name", "depth", "--vocab-size", "32", "--from", "image",
                 "--out", str(tmp_path / "four")]) == 0
    out = capsys.readouterr().out
    assert "continue training: mot train" in out and "--init-from" in out
    model, cfg, _ = runs.load_for_inference(tmp_path / "four")
    assert cfg.model.untie == ["attn", "ffn"] and cfg.model.param_tokens == 16 and cfg.model.n_modalities == 4
    meta = runs.read_meta(runs.resolve_checkpoint(tmp_path / "four"))
    assert meta["operation"] == "add-modality" and meta["weights_only"] and meta["derived_from"].startswith(
        str(tmp_path / "big"))
    tokens = _tokens(_model(dense), [0, 1, 2])  # text, image, speech ids are unchanged by the new modality's range
    torch.testing.assert_close(_logits64(model, tokens)[..., :64], _logits64(_model(dense), tokens)[..., :64],
                               rtol=1e-10, atol=1e-10)


def test_cli_errors_exit_2_with_the_reason(tmp_path, capsys):
    _checkpoint(tmp_path / "src", _run_config())
    assert main(["grow", str(tmp_path / "src"), "--param-tokens", "4", "--out", str(tmp_path / "x")]) == 2
    assert "growing only adds tokens" in capsys.readouterr().err
    assert main(["upcycle", str(tmp_path / "src"), "--out", str(tmp_path / "x")]) == 2
    assert "is already MoT" in capsys.readouterr().err
    assert main(["grow", str(tmp_path / "nowhere"), "--param-tokens", "16", "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint here" in capsys.readouterr().err
    assert main(["grow", str(tmp_path / "src"), "--param-tokens", "16", "--out", str(tmp_path / "src")]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


# ---------------------------------------------------------------- training continues


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


def test_training_resumes_from_a_grown_checkpoint(shards, tmp_path):
    """Grow at step 2 of 4: the grown run's first step sees the same batch and computes the same loss as the
    small run's step 3; then it goes on to the end of the schedule with its new tokens learning."""
    cfg = run_config(shards, tmp_path, steps=4, checkpoint_every=2, eval_every=0, eval_batches=1)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, projection="pattention", param_tokens=8))
    small = Trainer(cfg, progress=False)
    small.fit(until=2)
    third = small.fit(until=3).losses[0]
    src = ops.read_source(tmp_path / "tiny" / "checkpoints" / runs.checkpoint_name(2))
    grown_cfg, state, optimizer = ops.grow(src, 16)
    ops.write_derived(tmp_path / "grown", src, grown_cfg, state, optimizer, "grow", {})

    recipe = load_config(tmp_path / "grown" / "recipe.toml")
    result = Trainer(recipe, resume=True, progress=False).fit()
    assert result.step == 4 and result.run_dir == tmp_path / "grown"
    assert result.losses[0] == pytest.approx(third, rel=1e-5)
    final = runs.load_model_state(runs.latest_checkpoint(tmp_path / "grown" / "checkpoints"))
    assert final["blocks.0.attn.qkv.keys"][:, 8:16].abs().sum() > 0  # the new tokens' keys left zero
