"""`mot compare`: the FLOPs fraction at which MoT reaches dense's final loss, on curves with known answers,
and a smoke run of `mot compare --recipe` that trains both variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mot.compare import CompareError, compare_runs, flops_to_reach, load_run, matching_fractions
from tests.runs import make_shards, run_config, write_recipe


def test_crossing_is_interpolated_linearly_in_flops():
    curve = [(10.0, 5.0), (20.0, 3.0), (30.0, 2.0)]
    assert flops_to_reach(curve, 2.5) == pytest.approx(25.0)  # half way from 3.0 to 2.0
    assert flops_to_reach(curve, 3.0) == 20.0  # reached exactly at an evaluation
    assert flops_to_reach(curve, 6.0) == 10.0  # already below at the first evaluation
    assert flops_to_reach(curve, 1.0) is None  # never
    assert flops_to_reach([(10.0, 5.0), (20.0, 4.0), (30.0, 4.5), (40.0, 1.0)], 4.2) == pytest.approx(18.0)


def _fake_run(folder: Path, name: str, untie: list[str], losses: dict[str, list[float]]) -> Path:
    folder.mkdir(parents=True)
    modalities = [{"name": m} for m in ("text", "image")]
    (folder / "config.json").write_text(json.dumps({"name": name, "model": {"untie": untie,
                                                                            "modalities": modalities}}))
    rows = [{"kind": "train", "step": 1, "loss": 9.0}]
    for i in range(4):
        row = {"kind": "eval", "step": 100 * (i + 1), "flops": 10.0 * (i + 1), "wall_s": 2.0 * (i + 1)}
        row.update({k: v[i] for k, v in losses.items()})
        rows.append(row)
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_fractions_and_outputs_on_runs_with_a_known_answer(tmp_path):
    dense = _fake_run(tmp_path / "dense", "x-dense", [], {
        "loss": [4.0, 3.0, 2.5, 2.2], "loss/text": [3.0, 2.0, 1.5, 1.2], "loss/image": [5.0, 4.0, 3.5, 3.2]})
    mot = _fake_run(tmp_path / "mot", "x-mot", ["attn", "ffn", "norm"], {
        # all: crosses 2.2 between 20 (2.4) and 30 (2.0) -> 25 FLOPs = 62.5% of dense's 40.
        # text: reaches 1.2 exactly at 30 -> 75%. image: stays above 3.2 -> not reached.
        "loss": [3.5, 2.4, 2.0, 1.8], "loss/text": [2.5, 1.6, 1.2, 1.0], "loss/image": [5.5, 4.5, 3.6, 3.3]})
    fractions = matching_fractions(load_run(dense), load_run(mot), ["loss", "loss/text", "loss/image"])
    assert fractions == {"loss": pytest.approx(0.625), "loss/text": pytest.approx(0.75), "loss/image": None}

    report = compare_runs([mot, dense], tmp_path / "out")  # the dense run is found whatever the order
    assert report["reference"] == "x-dense"
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "62.5%" in table and "75.0%" in table and "not reached" in table
    assert (tmp_path / "out" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["runs"][0]["flops_fraction_to_match_reference"]["loss/image"] is None


def test_a_folder_without_a_log_is_refused(tmp_path):
    with pytest.raises(CompareError, match="not a run folder"):
        load_run(tmp_path)


def test_compare_recipe_trains_dense_and_mot_and_writes_the_table(tmp_path):
    from mot.cli import main

    shards = make_shards(tmp_path / "shards")
    cfg = run_config(shards, tmp_path / "runs", steps=6, eval_every=3, checkpoint_every=0)
    recipe = tmp_path / "tiny.toml"
    write_recipe(recipe, cfg)
    assert main(["compare", "--recipe", str(recipe)]) == 0
    out = tmp_path / "runs" / "tiny-compare"
    report = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["tiny-dense", "tiny-mot"]
    assert report["runs"][0]["dense"] and not report["runs"][1]["dense"]
    # Same data and FLOPs per token: both runs log the same training FLOPs.
    assert report["runs"][0]["flops"] == report["runs"][1]["flops"] > 0
    assert set(report["runs"][1]["flops_fraction_to_match_reference"]) == {
        "loss", "loss/text", "loss/image", "loss/speech"}
    assert (out / "compare.png").is_file() and "FLOPs to match" in (out / "compare.md").read_text()
