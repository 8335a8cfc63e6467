"""Recipes: unknown or ill-typed keys fail before any work starts, naming the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mot.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = """
name = "t"
[model]
dim = 64
n_layers = 2
n_heads = 4
untie = ["attn", "ffn", "norm"]

[[model.modalities]]
name = "text"
vocab_size = 100

[[model.modalities]]
name = "image"
vocab_size = 64

[train]
seq_len = 128
"""


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    return path


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


def test_valid_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.model.dim == 64
    assert [m.name for m in cfg.model.modalities] == ["text", "image"]
    assert cfg.train.seq_len == 128


def test_misspelled_key_names_key_and_file(tmp_path):
    path = _write(tmp_path, RECIPE.replace("untie =", "untye ="))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "'model.untye'" in message
    assert "did you mean 'untie'" in message


def test_misspelled_key_inside_modality_table(tmp_path):
    path = _write(tmp_path, RECIPE.replace('vocab_size = 64', 'vocab_sise = 64'))
    with pytest.raises(ConfigError, match=r"unknown key 'model\.modalities\.1\.vocab_sise'"):
        load_config(path)


def test_unknown_table(tmp_path):
    path = _write(tmp_path, RECIPE + "\n[trian]\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian' \(did you mean 'train'\?\)"):
        load_config(path)


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("dim = 64", 'dim = "64"', "model.dim"),
        ("dim = 64", "dim = 64.5", "model.dim"),
        ("seq_len = 128", "seq_len = true", "train.seq_len"),
        ('untie = ["attn", "ffn", "norm"]', 'untie = "ffn"', "model.untie"),
        ('untie = ["attn", "ffn", "norm"]', 'untie = ["ffn", 3]', "model.untie.1"),
    ],
)
def test_ill_typed_value_names_key(tmp_path, old, new, key):
    path = _write(tmp_path, RECIPE.replace(old, new))
    with pytest.raises(ConfigError, match=rf"'{key}' must be"):
        load_config(path)


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('untie = ["attn", "ffn", "norm"]', 'untie = ["attn", "mlp"]', "model.untie"),
        ("n_heads = 4", "n_heads = 5", "model.n_heads"),
        ("seq_len = 128", "seq_len = 99999", "train.seq_len"),
        ('name = "image"', 'name = "text"', "model.modalities"),
    ],
)
def test_inconsistent_values_fail(tmp_path, old, new, key):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        load_config(_write(tmp_path, RECIPE.replace(old, new)))


def test_missing_required_modality_field(tmp_path):
    path = _write(tmp_path, RECIPE.replace("vocab_size = 100\n", ""))
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['model.modalities.0.vocab_size'\]"):
        load_config(path)


def test_overrides(recipe):
    cfg = load_config(recipe, ["--model.dim=128", "--model.untie=[]", "--model.modalities.1.vocab_size=512",
                               "--model.norm_placement=chameleon", "--name=x"])
    assert cfg.model.dim == 128
    assert cfg.model.untie == []
    assert cfg.model.is_dense
    assert cfg.model.modalities[1].vocab_size == 512
    assert cfg.model.norm_placement == "chameleon"
    assert cfg.name == "x"
    assert load_config(recipe).train.flex_attention == "auto"
    assert load_config(recipe, ["--train.flex_attention=false"]).train.flex_attention is False
    assert load_config(recipe).train.master_weights == "auto"
    assert load_config(recipe, ["--train.master_weights=true"]).train.master_weights is True


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("--model.dimm=3", "unknown key 'model.dimm'"),
        ("--model.norm_placement=post", r"must be one of \['pre', 'chameleon'\]"),
        ("--model.modalities.5.vocab_size=3", "no list entry"),
        ("--model.dim", "expected --key=value"),
        ("--train.flex_attention=sometimes", r"'train.flex_attention' must be"),
        ("--train.master_weights=sometimes", r"'train.master_weights' must be"),
    ],
)
def test_bad_overrides(recipe, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(recipe, [override])


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[model\n"))


@pytest.mark.parametrize("path", sorted(REPO.glob("recipes/**/*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    load_config(path)


def test_master_weights_need_bf16_precision(recipe):
    with pytest.raises(ConfigError, match=r"'train.master_weights' needs bf16 precision"):
        load_config(recipe, ["--train.master_weights=true", "--train.precision=fp32"])
    assert load_config(recipe, ["--train.master_weights=true", "--train.precision=bf16"]).train.master_weights


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["--train.eval_batches=4", "--train.final_eval_batches=4"],
         r"'train.final_eval_batches' \(4\) must exceed train.eval_batches \(4\)"),
        (["--train.eval_batches=4", "--train.final_eval_batches=2"],
         r"'train.final_eval_batches' \(2\) must exceed train.eval_batches \(4\)"),
        (["--train.final_eval_batches=-1"], r"'train.final_eval_batches' must be >= 0"),
    ],
)
def test_final_eval_batches_is_zero_or_more_than_eval_batches(recipe, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(recipe, overrides)
    assert load_config(recipe).train.final_eval_batches == 0  # none by default
    assert load_config(recipe, ["--train.eval_batches=4", "--train.final_eval_batches=5"]).train.final_eval_batches == 5
