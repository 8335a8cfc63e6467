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
    assert "Evaluation noise" in table
    assert f"| tiny-mot-s1 | {last_eval['loss']:.4f} +- {last_eval['se']:.4f} |" in table
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


def test_one_seed_given_names_its_runs_by_the_seed_so_a_later_call_finds_them(tmp_path, capsys):
    """The GPU machine runs one seed per call (`h200.sh train 2`): `--seeds 2` names the runs NAME-dense-s2 and
    NAME-mot-s2, as `--seeds 0 1 2` would, and a later `--resume` with the same seed leaves them alone."""
    from mot.cli import main

    shards = make_shards(tmp_path / "shards")
    write_recipe(tmp_path / "tiny.toml", run_config(shards, tmp_path / "runs", steps=2, eval_every=0,
                                                     checkpoint_every=0))
    assert main(["compare", "--recipe", str(tmp_path / "tiny.toml"), "--seeds", "2"]) == 0
    for name in ("tiny-dense-s2", "tiny-mot-s2"):
        assert json.loads((tmp_path / "runs" / name / "config.json").read_text())["train"]["seed"] == 2
    assert not (tmp_path / "runs" / "tiny-dense").exists()
    capsys.readouterr()
    assert main(["compare", "--recipe", str(tmp_path / "tiny.toml"), "--seeds", "2", "--resume"]) == 0
    assert "mot compare: tiny-mot-s2 is finished" in capsys.readouterr().out


WEIGHTS = (1.0, 0.5)  # text, image: the weighted loss of the paired table weighs each modality's sums


def _evaluation(sums: np.ndarray, counts: np.ndarray, step: int) -> dict:
    """An evaluation row as `mot train` logs it, from per-micro-batch sums and counts (text, image); its se's are
    markers (step / 1000 + 0.001 per modality) to tell which row a table read."""
    row = {"step": step, "flops": float(step), "wall_s": float(step),
           "loss": float((sums * WEIGHTS).sum() / counts.sum()), "se": step / 1000,
           "micro_batches": {"sums": sums.tolist(), "counts": counts.tolist()}}
    for i, name in enumerate(("text", "image")):
        row.update({f"loss/{name}": float(sums[:, i].sum() / counts[:, i].sum()),
                    f"se/{name}": step / 1000 + 0.001 * (i + 1), f"tokens/{name}": int(counts[:, i].sum())})
    return row


def _evaluated_run(folder: Path, name: str, untie: list[str], evals: list[tuple[np.ndarray, np.ndarray]],
                   final: tuple[np.ndarray, np.ndarray] | None) -> Path:
    """A run with an eval row at steps 10, 20, ... and, if given, a final_eval row at its last step."""
    folder.mkdir(parents=True)
    modalities = [{"name": "text", "loss_weight": WEIGHTS[0]}, {"name": "image", "loss_weight": WEIGHTS[1]}]
    (folder / "config.json").write_text(json.dumps({"name": name, "train": {"seed": 0},
                                                    "model": {"untie": untie, "modalities": modalities}}))
    rows = [{"kind": "eval", **_evaluation(s, c, 10 * (i + 1))} for i, (s, c) in enumerate(evals)]
    if final is not None:
        rows.append({"kind": "final_eval", **_evaluation(*final, 10 * len(evals)), "se": 0.5})
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _held_out(rng: np.random.Generator, batches: int, counts: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    counts = rng.integers(20, 60, size=(batches, 2)).astype(float) if counts is None else counts
    return rng.gamma(4.0, 0.5, size=(batches, 2)) * counts, counts


def _paired_by_hand(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> dict[str, tuple]:
    """Per loss key, the difference of the two runs' losses and its clustered standard error, in numpy."""
    (sa, counts), (sb, _) = a, b
    out = {}
    for key, diffs, c in (("loss", ((sa - sb) * WEIGHTS).sum(1), counts.sum(1)),
                          ("loss/text", sa[:, 0] - sb[:, 0], counts[:, 0]),
                          ("loss/image", sa[:, 1] - sb[:, 1], counts[:, 1])):
        mean = diffs.sum() / c.sum()
        out[key] = (mean, np.sqrt(len(c) / (len(c) - 1) * ((diffs - mean * c) ** 2).sum()) / c.sum())
    return out


def test_the_paired_table_uses_the_larger_final_evaluation_when_both_runs_have_one(tmp_path):
    rng = np.random.default_rng(0)
    counts, final_counts = (rng.integers(20, 60, size=(n, 2)).astype(float) for n in (4, 40))
    dense_evals = [_held_out(rng, 4, counts), _held_out(rng, 4, counts)]
    mot_evals = [_held_out(rng, 4, counts), _held_out(rng, 4, counts)]
    dense_final, mot_final = _held_out(rng, 40, final_counts), _held_out(rng, 40, final_counts)
    dense = _evaluated_run(tmp_path / "d", "d", [], dense_evals, dense_final)
    mot = _evaluated_run(tmp_path / "m", "m", ["ffn"], mot_evals, mot_final)
    report = compare_runs([dense, mot], tmp_path / "out")
    d, m = report["runs"]
    tokens = int(final_counts.sum())
    assert m["final_eval_difference_from"] == {"rows": "final_eval", "tokens": tokens}
    for key, (difference, se) in _paired_by_hand(mot_final, dense_final).items():
        assert m["final_eval_difference"][key]["difference"] == pytest.approx(difference, rel=1e-9), key
        assert m["final_eval_difference"][key]["se"] == pytest.approx(se, rel=1e-9), key
    # the noise table: each run's final_eval row (se 0.5, se/text 0.021, se/image 0.022), not its last eval row's
    assert d["final_eval_se"] == m["final_eval_se"] == {"loss": 0.5, "loss/text": 0.021, "loss/image": 0.022}
    assert d["final_eval_se_from"] == m["final_eval_se_from"] == {"rows": "final_eval", "tokens": tokens}
    assert m["final_eval_large"]["loss/image"] == pytest.approx(mot_final[0][:, 1].sum() / final_counts[:, 1].sum())
    assert m["final_eval_large_se"]["loss"] == 0.5 and m["final_eval_large_tokens"] == tokens
    # the curve's figures stay on the periodic evaluations
    assert m["final_eval"]["loss/text"] == pytest.approx(mot_evals[-1][0][:, 0].sum() / counts[:, 0].sum())
    assert m["flops"] == 20.0
    table = (tmp_path / "out" / "compare.md").read_text()
    assert table.count(f"| final_eval ({tokens:,} tokens) |") == 3  # two noise rows, one paired row
    large = [mot_final[0][:, :].dot(WEIGHTS).sum() / final_counts.sum(),
             *(mot_final[0][:, i].sum() / final_counts[:, i].sum() for i in range(2))]
    # the loss beside each se is the larger set's, the row the se belongs to (not the periodic final loss)
    assert (f"| m | {large[0]:.4f} +- 0.5000 | {large[1]:.4f} +- 0.0210 | {large[2]:.4f} +- 0.0220 | "
            f"final_eval ({tokens:,} tokens) |") in table


@pytest.mark.parametrize("why", ["mot has none", "other micro-batches", "older log"])
def test_the_paired_table_falls_back_to_the_last_eval_rows(tmp_path, why):
    rng = np.random.default_rng(1)
    counts = rng.integers(20, 60, size=(4, 2)).astype(float)
    dense_evals, mot_evals = [_held_out(rng, 4, counts)], [_held_out(rng, 4, counts)]
    dense_final = None if why == "older log" else _held_out(rng, 12)
    mot_final = {"mot has none": None, "older log": None, "other micro-batches": _held_out(rng, 12)}[why]
    dense = _evaluated_run(tmp_path / "d", "d", [], dense_evals, dense_final)
    mot = _evaluated_run(tmp_path / "m", "m", ["ffn"], mot_evals, mot_final)
    assert (load_run(mot).final_eval is None) == (mot_final is None)
    report = compare_runs([dense, mot], tmp_path / "out")
    d, m = report["runs"]
    tokens = int(counts.sum())
    assert m["final_eval_difference_from"] == m["final_eval_se_from"] == {"rows": "eval", "tokens": tokens}
    for key, (difference, se) in _paired_by_hand(mot_evals[-1], dense_evals[-1]).items():
        assert m["final_eval_difference"][key]["difference"] == pytest.approx(difference, rel=1e-9), key
        assert m["final_eval_difference"][key]["se"] == pytest.approx(se, rel=1e-9), key
    assert m["final_eval_se"] == {"loss": 0.01, "loss/text": 0.011, "loss/image": 0.012}  # the step-10 eval row
    assert ("final_eval_large" in m) == (mot_final is not None)
    # the dense run, its own reference, reads its own final_eval row where it has one
    assert d["final_eval_se_from"]["rows"] == ("eval" if dense_final is None else "final_eval")
    table = (tmp_path / "out" / "compare.md").read_text()
    s, c = mot_evals[-1]
    last = [s.dot(WEIGHTS).sum() / c.sum(), *(s[:, i].sum() / c[:, i].sum() for i in range(2))]
    assert (f"| m | {last[0]:.4f} +- 0.0100 | {last[1]:.4f} +- 0.0110 | {last[2]:.4f} +- 0.0120 | "
            f"eval ({tokens:,} tokens) |") in table


def test_the_difference_curves_give_each_steps_paired_gap_and_are_plotted(tmp_path):
    """compare_differences.png: MoT minus dense at every evaluation both made on the same batches, with the
    paired standard error of each (numpy by hand); none where a step's batches differ, no plot without sums."""
    from mot.compare import difference_curves

    rng = np.random.default_rng(2)
    counts = rng.integers(20, 60, size=(5, 2)).astype(float)
    dense_evals = [_held_out(rng, 5, counts) for _ in range(3)]
    mot_evals = [_held_out(rng, 5, counts) for _ in range(2)] + [_held_out(rng, 5)]  # step 30: other batches
    dense = _evaluated_run(tmp_path / "d", "d", [], dense_evals, None)
    mot = _evaluated_run(tmp_path / "m", "m", ["ffn"], mot_evals, None)
    curves = difference_curves(load_run(mot), load_run(dense), ["loss", "loss/text", "loss/image"])
    for key, points in curves.items():
        assert [x for x, _, _ in points] == [10.0, 20.0], key  # the eval rows' flops are their steps
        for (_, difference, se), m, d in zip(points, mot_evals, dense_evals, strict=False):
            expected_difference, expected_se = _paired_by_hand(m, d)[key]
            assert difference == pytest.approx(expected_difference, rel=1e-9)
            assert se == pytest.approx(expected_se, rel=1e-9)
    report = compare_runs([dense, mot], tmp_path / "out")
    assert report["differences_plot"] == "compare_differences.png"
    assert (tmp_path / "out" / "compare_differences.png").stat().st_size > 0

    bare = tmp_path / "bare"
    for folder in (dense, mot):
        log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        (bare / folder.name).mkdir(parents=True)
        (bare / folder.name / "config.json").write_text((folder / "config.json").read_text())
        (bare / folder.name / "log.jsonl").write_text(
            "".join(json.dumps({k: v for k, v in r.items() if k != "micro_batches"}) + "\n" for r in log))
    report = compare_runs([bare / "d", bare / "m"], tmp_path / "out_bare")
    assert "differences_plot" not in report and not (tmp_path / "out_bare" / "compare_differences.png").exists()
