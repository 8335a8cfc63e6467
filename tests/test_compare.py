"""`mot compare`: the FLOPs fraction at which MoT reaches dense's final loss, on curves with known answers,
and a smoke run of `mot compare --recipe` that trains both variants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mot.compare import CompareError, compare_runs, flops_to_reach, load_run, matching_fractions
from mot.train.metrics_log import read_log
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


def _timed_run(folder: Path, name: str, untie: list[str], seed: int, step_ms: list[float], losses: list[float]
               ) -> Path:
    """A run logging a train row every 5 steps (step_ms each) and an eval every 10 steps (losses), its wall_s the
    sum of its step times, as `mot train` writes them."""
    folder.mkdir(parents=True)
    modalities = [{"name": "text"}, {"name": "image"}]
    (folder / "config.json").write_text(json.dumps({"name": name, "train": {"seed": seed},
                                                    "model": {"untie": untie, "modalities": modalities}}))
    rows, wall = [], 0.0
    for i, ms in enumerate(step_ms):
        step = 5 * (i + 1)
        wall += 5 * ms / 1e3
        rows.append({"kind": "train", "step": step, "loss": 9.0, "step_ms": ms, "wall_s": wall})
        if step % 10 == 0:
            loss = losses[step // 10 - 1]
            rows.append({"kind": "eval", "step": step, "flops": float(step), "wall_s": wall, "loss": loss,
                         "loss/text": loss, "loss/image": loss})
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_wall_clock_to_match_leaves_the_warm_up_out(tmp_path):
    # dense: 1000 ms per step for the first 5 steps (compile), then 100: steady 0.1 s, warm-up 5 x 0.9 = 4.5 s,
    # so 1.0 s of steps at step 10 and 2.0 s at step 20. MoT: 800 then 120 ms: steady 0.12, warm-up 3.4 s,
    # 1.2 s at step 10, where it already has the dense run's final loss: 1.2 / 2.0 of the dense wall-clock.
    dense = _timed_run(tmp_path / "d", "d", [], 0, [1000, 100, 100, 100], [3.0, 2.0])
    mot = _timed_run(tmp_path / "m", "m", ["ffn"], 0, [800, 120, 120, 120], [2.0, 1.5])
    report = compare_runs([dense, mot], tmp_path / "out")
    d, m = report["runs"]
    assert d["warmup_s"] == pytest.approx(4.5) and m["warmup_s"] == pytest.approx(3.4)
    assert d["wall_compute_s"] == pytest.approx(2.0) and m["wall_compute_s"] == pytest.approx(2.4)
    assert m["steady_step_ratio"] == pytest.approx(1.2)
    assert m["flops_fraction_to_match_reference"]["loss"] == pytest.approx(0.5)
    assert m["wall_fraction_to_match_reference"]["loss"] == pytest.approx(0.6)  # with the warm-up in: 4.6 / 6.5
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "| m | MoT | 0 | 20 |" in table and "60.0%" in table and "| 1.200 | 3.4 |" in table


def test_each_mot_run_meets_the_dense_run_of_its_seed_and_the_seeds_give_a_band(tmp_path):
    steps = [100, 100, 100, 100]
    runs = [
        _timed_run(tmp_path / "d0", "d0", [], 0, steps, [3.0, 2.0]),
        _timed_run(tmp_path / "d1", "d1", [], 1, steps, [3.0, 2.5]),
        # seed 0 reaches 2.0 at step 20 (fraction 1.0); against seed 1's dense (2.5) it would be 0.75
        _timed_run(tmp_path / "m0", "m0", ["ffn"], 0, steps, [3.0, 2.0]),
        # seed 1 reaches 2.5 half way between steps 10 and 20: 15 / 20
        _timed_run(tmp_path / "m1", "m1", ["ffn"], 1, steps, [3.0, 2.0]),
        # seed 2 has no dense run of its own: the first dense run (seed 0) is its reference; never reaches 2.0
        _timed_run(tmp_path / "m2", "m2", ["ffn"], 2, steps, [3.0, 2.2]),
    ]
    report = compare_runs(runs, tmp_path / "out")
    by_name = {r["name"]: r for r in report["runs"]}
    assert [by_name[n]["reference"] for n in ("m0", "m1", "m2")] == ["d0", "d1", "d0"]
    assert "reference" not in by_name["d0"] and "reference" not in by_name["d1"]  # each its seed's reference
    assert by_name["m0"]["flops_fraction_to_match_reference"]["loss"] == pytest.approx(1.0)
    assert by_name["m1"]["flops_fraction_to_match_reference"]["loss"] == pytest.approx(0.75)
    (group,) = report["bands"]
    assert group["seeds"] == [0, 1, 2]
    assert group["flops_fraction"]["loss"] == {"runs": 3, "reached": 2, "mean": pytest.approx(0.875),
                                               "min": pytest.approx(0.75), "max": pytest.approx(1.0)}
    assert "87.5% (75.0-100.0%, 2 of 3)" in (tmp_path / "out" / "compare.md").read_text()


def test_a_folder_without_a_log_is_refused(tmp_path):
    with pytest.raises(CompareError, match="not a run folder"):
        load_run(tmp_path)


def test_compare_recipe_trains_dense_and_mot_and_writes_the_table(tmp_path):
    from mot.cli import main

    shards = make_shards(tmp_path / "shards")
    cfg = run_config(shards, tmp_path / "runs", steps=6, eval_every=3, checkpoint_every=0)
    cfg.data.eval_fraction = 0.5  # a held-out set the evaluation does not repeat: it reports standard errors
    recipe = tmp_path / "tiny.toml"
    write_recipe(recipe, cfg)
    assert main(["compare", "--recipe", str(recipe), "--seeds", "0", "1"]) == 0
    out = tmp_path / "runs" / "tiny-compare"
    report = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["tiny-dense-s0", "tiny-mot-s0", "tiny-dense-s1", "tiny-mot-s1"]
    assert [(r["dense"], r["seed"]) for r in report["runs"]] == [(True, 0), (False, 0), (True, 1), (False, 1)]
    # Same data (per seed: train.seed orders it too) and FLOPs per token: a pair logs the same training FLOPs.
    flops = [r["flops"] for r in report["runs"]]
    assert flops[0] == flops[1] > 0 and flops[2] == flops[3] > 0
    assert report["runs"][3]["reference"] == "tiny-dense-s1"
    assert set(report["runs"][1]["flops_fraction_to_match_reference"]) == {
        "loss", "loss/text", "loss/image", "loss/speech"}
    assert report["bands"][0]["seeds"] == [0, 1] and report["runs"][1]["steady_step_ratio"] > 0
    table = (out / "compare.md").read_text()
    assert (out / "compare.png").is_file() and "FLOPs to match" in table and "Over seeds [0, 1]" in table
    # the evaluation's noise: each run's final standard errors, from its log's last eval row
    last_eval = [r for r in read_log(tmp_path / "runs" / "tiny-mot-s1" / "log.jsonl") if r["kind"] == "eval"][-1]
    assert report["runs"][3]["final_eval_se"] == {"loss": last_eval["se"], "loss/text": last_eval["se/text"],
                                                  "loss/image": last_eval["se/image"],
                                                  "loss/speech": last_eval["se/speech"]}
    assert "Evaluation noise" in table and f"| tiny-mot-s1 | {last_eval['se']:.4f} |" in table
    # MoT minus dense on the same held-out batches, with the standard error of the paired difference
    dense_eval = [r for r in read_log(tmp_path / "runs" / "tiny-dense-s1" / "log.jsonl") if r["kind"] == "eval"][-1]
    mot, dense = last_eval["micro_batches"], dense_eval["micro_batches"]
    assert mot["counts"] == dense["counts"]  # the same tokens in the same micro-batches
    for i, name in enumerate(["text", "image", "speech"]):
        diffs = np.array([a[i] - b[i] for a, b in zip(mot["sums"], dense["sums"], strict=True)])
        counts = np.array([c[i] for c in mot["counts"]])
        mean = diffs.sum() / counts.sum()
        se = np.sqrt(len(diffs) / (len(diffs) - 1) * ((diffs - mean * counts) ** 2).sum()) / counts.sum()
        got = report["runs"][3]["final_eval_difference"][f"loss/{name}"]
        assert got["difference"] == pytest.approx(last_eval[f"loss/{name}"] - dense_eval[f"loss/{name}"])
        assert got["difference"] == pytest.approx(mean) and got["se"] == pytest.approx(se, rel=1e-9)
    assert "Final eval loss minus the dense run's" in table


@pytest.mark.parametrize(("cut_run", "cut_step", "killed"),
                         [("tiny-dense", 2, False), ("tiny-mot", 2, False), ("tiny-dense", 6, False),
                          ("tiny-mot", 2, True)])
def test_compare_recipe_stopped_by_a_signal_resumes_each_run_where_it_stopped(tmp_path, monkeypatch, cut_run,
                                                                             cut_step, killed):
    """The GPU machine's 10-minute commands: `timeout -s INT` cuts `mot compare --recipe` in one of its runs
    (or in a run's last step: the next run must not start, or it would run past the time limit); the next
    `--resume` leaves a finished run alone (its summary too), continues the cut one from its checkpoint,
    starts the one not begun, starts again one killed before its first checkpoint (its log is not appended
    to), and gives the curves of an uncut comparison."""
    import os
    import shutil
    import signal

    from mot.cli import main
    from mot.train import loop
    from mot.train.metrics_log import read_log

    shards = make_shards(tmp_path / "shards")
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    for where in (straight, cut):
        where.mkdir()
        write_recipe(where / "tiny.toml", run_config(shards, where / "runs", steps=6, eval_every=3,
                                                     checkpoint_every=0))
    assert main(["compare", "--recipe", str(straight / "tiny.toml")]) == 0

    real_update = loop.update

    def signalled(state, log):
        out = real_update(state, log)
        if state.cfg.name == cut_run and state.step == cut_step:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(loop, "update", signalled)
    assert main(["compare", "--recipe", str(cut / "tiny.toml")]) == 130
    assert not (cut / "runs" / "tiny-compare").exists()
    assert (cut / "runs" / "tiny-mot").exists() == (cut_run == "tiny-mot")
    dense_log = (cut / "runs" / "tiny-dense" / "log.jsonl").read_text()
    if killed:  # as if killed before its first checkpoint: a log and no checkpoint
        shutil.rmtree(cut / "runs" / cut_run / "checkpoints")
    monkeypatch.setattr(loop, "update", real_update)
    assert main(["compare", "--recipe", str(cut / "tiny.toml"), "--resume"]) == 0
    if cut_run == "tiny-mot" or cut_step == 6:
        assert (cut / "runs" / "tiny-dense" / "log.jsonl").read_text() == dense_log  # not trained again
    for name in ("tiny-dense", "tiny-mot"):
        a, b = (read_log(w / "runs" / name / "log.jsonl") for w in (straight, cut))
        assert [r["step"] for r in b if r["kind"] == "eval"] == [3, 6]
        assert [r["step"] for r in b if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
        assert [r["loss"] for r in a if r["kind"] == "eval"] == [r["loss"] for r in b if r["kind"] == "eval"]
        summary = json.loads((cut / "runs" / name / "summary.json").read_text())
        assert (summary["step"], summary["steps"]) == (6, 6) and summary["eval"]["loss"] == b[-1]["loss"]
    report = json.loads((cut / "runs" / "tiny-compare" / "compare.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["tiny-dense", "tiny-mot"]
