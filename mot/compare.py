"""MoT against dense as the paper measures it: eval loss against training FLOPs per modality, and the
fraction of the dense run's FLOPs at which the MoT run first reaches the dense run's final eval loss.

    report = compare_runs(["runs/x-dense-s0", "runs/x-mot-s0", "runs/x-dense-s1", "runs/x-mot-s1"], "out/")
    folders = train_pairs(cfg, "recipes/x.toml", seeds=[0, 1, 2])      # both variants per seed, then compare

Reads each run's `log.jsonl` (eval rows carry cumulative training FLOPs and wall time, so nothing is
recomputed) and `config.json`. Each MoT run is measured against the dense run of the same `train.seed` (else
the first dense run; else the first run). The crossing is interpolated linearly in FLOPs between the two
evaluations around it; a curve that never gets down to the dense loss is "not reached". With several seeds,
the fractions of the MoT runs of one variant are summarised as mean, min and max: the band over seeds.

The FLOPs and wall-clock to match use the periodic eval rows (one held-out set along the whole curve). The
final losses' standard errors and the paired MoT-minus-dense differences use the runs' `final_eval` rows (a
larger held-out set at the last step, train.final_eval_batches) where a run and its dense run both have one
over the same micro-batches, else their last eval rows; the report names the set and its tokens.

Wall-clock: the log's `wall_s` sums the training steps alone (start-up, data preparation and evaluations are
outside it). From that sum this takes out the warm-up, what steps took beyond the steady step time (compile
and recompiles, CUDA graph capture, cold caches): each log window's excess over the run's median step time.
The warm-up is reported per run beside the compile-free wall-clock-to-match and the steady step-time ratio.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mot.stats import ratio_standard_error
from mot.train.metrics_log import read_log


class CompareError(ValueError):
    """Runs that cannot be compared; the message names the run folder."""


@dataclass
class RunCurves:
    name: str
    folder: Path
    dense: bool
    modalities: list[str]
    evals: list[dict[str, Any]]  # eval rows in step order
    seed: int = 0
    untie: tuple[str, ...] = ()
    trains: tuple[dict[str, Any], ...] = ()  # train rows in step order (step_ms of each log window)
    model_modalities: tuple[dict[str, Any], ...] = ()  # config.json's model.modalities (loss weights)
    diffusion: bool = False  # some modality is trained by diffusion: the weighted loss is no single ratio
    final_eval: dict[str, Any] | None = None  # the log's final_eval row (train.final_eval_batches), if any

    def curve(self, key: str, x: str = "flops") -> list[tuple[float, float]]:
        return [(row[x], row[key]) for row in self.evals if row.get(key) is not None and row.get(x) is not None]


def load_run(folder: str | Path) -> RunCurves:
    folder = Path(folder)
    log, config = folder / "log.jsonl", folder / "config.json"
    if not log.is_file() or not config.is_file():
        raise CompareError(f"{folder}: not a run folder (needs log.jsonl and config.json written by `mot train`)")
    cfg = json.loads(config.read_text())
    rows = read_log(log)
    evals = sorted((r for r in rows if r["kind"] == "eval"), key=lambda r: r["step"])
    if not evals:
        raise CompareError(f"{folder}: the log holds no evaluation; train with data.eval_fraction > 0")
    trains = tuple(sorted((r for r in rows if r["kind"] == "train" and "step_ms" in r), key=lambda r: r["step"]))
    finals = sorted((r for r in rows if r["kind"] == "final_eval"), key=lambda r: r["step"])  # none in older logs
    modalities = [m["name"] for m in cfg["model"]["modalities"]]
    dense = not cfg["model"]["untie"] or len(modalities) == 1
    return RunCurves(cfg.get("name", folder.name), folder, dense, modalities, evals,
                     seed=cfg.get("train", {}).get("seed", 0), untie=tuple(cfg["model"]["untie"]), trains=trains,
                     model_modalities=tuple(cfg["model"]["modalities"]),
                     diffusion=any(m.get("objective", "ar") == "diffusion" for m in cfg["model"]["modalities"]),
                     final_eval=finals[-1] if finals else None)


def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """FLOPs at which a (flops, loss) curve first gets down to `target`, linear between points; None if never.
    A curve already at or below target at its first point reaches it there."""
    previous = None
    for flops, loss in curve:
        if loss <= target:
            if previous is None:
                return flops
            (f0, l0) = previous
            return f0 + (flops - f0) * (l0 - target) / (l0 - loss)
        previous = (flops, loss)
    return None


def matching_fractions(reference: RunCurves, other: RunCurves, keys: list[str], x: str = "flops"
                       ) -> dict[str, float | None]:
    """Per key: the fraction of the reference's total `x` (training FLOPs, or any cumulative column of the eval
    rows) at which `other` reaches the reference's final loss."""
    total = reference.evals[-1][x]
    out = {}
    for key in keys:
        ref = reference.curve(key, x)
        if not ref:
            continue
        reached = flops_to_reach(other.curve(key, x), ref[-1][1])
        out[key] = None if reached is None else reached / total
    return out


# ---------------------------------------------------------------- wall-clock without warm-up


def windows(run: RunCurves) -> list[tuple[int, float]]:
    """(last step, seconds per step) of each log window, the steps of a window since the previous row."""
    out, previous = [], 0
    for row in run.trains:
        if row["step"] > previous:
            out.append((row["step"], row["step_ms"] / 1e3))
            previous = row["step"]
    return out


def steady_step_s(run: RunCurves) -> float | None:
    """The median of the windows' seconds per step (each window weighted once): the steady step time."""
    times = [s for _, s in windows(run)]
    return statistics.median(times) if times else None


def warmup_by_step(run: RunCurves) -> list[tuple[int, float]]:
    """Cumulative warm-up seconds at the end of each window: the window's steps times its excess per step over
    the steady step time, summed."""
    steady, total, previous, out = steady_step_s(run), 0.0, 0, []
    for step, seconds in windows(run):
        total += max(0.0, seconds - steady) * (step - previous)
        out.append((step, total))
        previous = step
    return out


def with_compute_wall(run: RunCurves) -> RunCurves:
    """The run with `wall_compute_s` in every eval row: its wall_s less the warm-up up to that step (None where
    the log has no step times)."""
    warmup = warmup_by_step(run)
    evals = []
    for row in run.evals:
        spent = next((w for step, w in reversed(warmup) if step <= row["step"]), 0.0) if warmup else None
        wall = row.get("wall_s")
        evals.append({**row, "wall_compute_s": None if wall is None or spent is None else wall - spent})
    return dataclasses.replace(run, evals=evals)


# ---------------------------------------------------------------- the report


def reference_for(run: RunCurves, runs: list[RunCurves]) -> RunCurves:
    """The dense run of the same seed, else the first dense run, else the first run."""
    dense = [r for r in runs if r.dense]
    return next((r for r in dense if r.seed == run.seed), dense[0] if dense else runs[0])


def band(values: list[float | None]) -> dict[str, Any]:
    """Mean, min and max of the reached values, and how many of all reached."""
    reached = [v for v in values if v is not None]
    summary: dict[str, Any] = {"runs": len(values), "reached": len(reached)}
    if reached:
        summary.update(mean=statistics.mean(reached), min=min(reached), max=max(reached))
    return summary


def compare_runs(folders: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Write compare.png, compare.md and compare.json into out_dir; return the JSON report."""
    runs = [with_compute_wall(load_run(f)) for f in folders]
    if len(runs) < 2:
        raise CompareError("compare needs at least two run folders")
    reference = reference_for(runs[0], runs) if any(r.dense for r in runs) else runs[0]
    keys = ["loss", *(f"loss/{m}" for m in reference.modalities)]
    report: dict[str, Any] = {"reference": reference.name, "reference_dense": reference.dense, "keys": keys,
                              "runs": [], "bands": []}
    for run in runs:
        final, steady = run.evals[-1], steady_step_s(run)
        warmup = warmup_by_step(run)
        ref = reference_for(run, runs)
        noise_row, _, noise_set = final_rows(run, ref)
        entry = {
            "name": run.name, "folder": str(run.folder), "dense": run.dense, "seed": run.seed,
            "untie": list(run.untie), "steps": final["step"], "flops": final["flops"], "wall_s": final.get("wall_s"),
            "wall_compute_s": final.get("wall_compute_s"), "warmup_s": warmup[-1][1] if warmup else None,
            "steady_step_s": steady, "final_eval": losses(final, keys),
            "final_eval_se": standard_errors(noise_row, keys),
            "final_eval_se_loss": losses(noise_row, keys),  # the losses of the row the se's belong to
            "final_eval_se_from": held_out_set(noise_row, noise_set),
        }
        if run.final_eval is not None:  # the larger final evaluation (train.final_eval_batches)
            entry.update(final_eval_large=losses(run.final_eval, keys),
                         final_eval_large_se=standard_errors(run.final_eval, keys),
                         final_eval_large_tokens=held_out_tokens(run.final_eval))
        if run is not ref:
            ref_steady = steady_step_s(ref)
            row, _, kind = final_rows(run, ref)
            entry.update(
                final_eval_difference=paired_difference(run, ref, keys),
                final_eval_difference_from=held_out_set(row, kind),
                reference=ref.name,
                flops_fraction_to_match_reference=matching_fractions(ref, run, keys),
                wall_fraction_to_match_reference=(matching_fractions(ref, run, keys, "wall_compute_s")
                                                  if entry["wall_compute_s"] is not None
                                                  and ref.evals[-1].get("wall_compute_s") else {}),
                steady_step_ratio=steady / ref_steady if steady and ref_steady else None)
        report["runs"].append(entry)
    compared = [r for r in report["runs"] if "reference" in r and not r["dense"]]
    for untie in dict.fromkeys(tuple(r["untie"]) for r in compared):  # one band per MoT variant
        members = [r for r in compared if tuple(r["untie"]) == untie]
        report["bands"].append({
            "untie": list(untie), "seeds": [r["seed"] for r in members],
            "flops_fraction": {k: band([r["flops_fraction_to_match_reference"].get(k) for r in members])
                               for k in keys},
            "wall_fraction": {k: band([r["wall_fraction_to_match_reference"].get(k) for r in members])
                              for k in keys},
            "steady_step_ratio": band([r["steady_step_ratio"] for r in members]),
        })
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot(runs, keys, out / "compare.png")
    if _plot_differences(runs, keys, out / "compare_differences.png"):
        report["differences_plot"] = "compare_differences.png"
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    (out / "compare.md").write_text(markdown_table(report, keys))
    return report


def train_pairs(cfg, where: str, seeds: list[int] | None = None, resume: bool = False,
                overwrite: bool = False) -> list[Path]:
    """Train the recipe's dense baseline and its MoT model for each seed (same data order per seed: only the
    untied parameters differ); their run folders. Run names: NAME-dense, NAME-mot with the recipe's seed;
    NAME-dense-s1, NAME-mot-s1, ... with seeds given, so that runs of one seed started apart (another call,
    a --resume) keep their names."""
    import dataclasses
    import os

    from mot.config import ConfigError
    from mot.flops import dense_baseline
    from mot.runs import checkpoint_step, list_checkpoints
    from mot.train.loop import StopSignal
    from mot.train.trainer import train

    if cfg.model.is_dense:
        raise ConfigError(f"{where}: model.untie is empty: the recipe is already the dense baseline")
    suffixed = bool(seeds)
    seeds = seeds or [cfg.train.seed]
    folders = []
    # One process checks for a stop between runs; several agree inside the next run, at its first log step
    # (each process may have seen the signal at another moment, and none may start a run the others skip).
    single = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    with StopSignal() as stop:  # a signal during one run's last step stops the next one from starting
        for seed in seeds:
            suffix = f"-s{seed}" if suffixed else ""
            for label, model in (("dense", dense_baseline(cfg.model)), ("mot", cfg.model)):
                variant = dataclasses.replace(cfg, name=f"{cfg.name}-{label}{suffix}", model=model,
                                              train=dataclasses.replace(cfg.train, seed=seed))
                run_dir = Path(cfg.train.out_dir) / variant.name
                saved = list_checkpoints(run_dir / "checkpoints")
                if resume and saved and checkpoint_step(saved[-1]) >= cfg.train.steps:
                    print(f"mot compare: {variant.name} is finished")
                    folders.append(run_dir)
                    continue
                if single and stop.received is not None:
                    raise stop.stopped(f"training {variant.name}")
                # --resume continues each run from its checkpoints, and starts again those that have none (a
                # run cut before its first checkpoint leaves only a log)
                resume_this = True if resume and saved else None
                again = overwrite or bool(resume and not saved and run_dir.exists())
                print(f"mot compare: training {variant.name}" + (" (resumed)" if resume_this else ""))
                folders.append(train(variant, where, resume=resume_this, overwrite=again).run_dir)
    return folders


def _plot(runs: list[RunCurves], keys: list[str], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 6.4), squeeze=False)
    panels = (("flops", "training FLOPs"), ("wall_compute_s", "wall-clock of training steps, warm-up out (s)"))
    for col, key in enumerate(keys):
        for row, (x, label) in enumerate(panels):
            ax = axes[row][col]
            for run in runs:
                points = run.curve(key, x)
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", ms=3,
                            label=f"{run.name} ({'dense' if run.dense else 'MoT'})")
            ax.set_xlabel(label)
            ax.set_ylabel("eval loss (nats)")
            ax.set_title("all modalities (weighted)" if key == "loss" else key.split("/", 1)[1])
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # a log without step times has no warm-up-free wall-clock
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _plot_differences(runs: list[RunCurves], keys: list[str], out_png: Path) -> bool:
    """compare_differences.png: per loss key, each MoT run's eval loss minus its dense run's against training
    FLOPs, with a band of 2 paired standard errors, and each further dense seed minus the first dense run
    (grey, dashed): the seed spread the gap has to exceed. False (nothing written) without paired rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    dense = [r for r in runs if r.dense]
    pairs = [(r, reference_for(r, runs), False) for r in runs if not r.dense and dense]
    pairs += [(r, dense[0], True) for r in dense[1:]]
    curves = [(run, ref, spread, difference_curves(run, ref, keys)) for run, ref, spread in pairs]
    if not any(points for *_, c in curves for points in c.values()):
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    legend: dict[str, Any] = {}
    for col, key in enumerate(keys):
        ax = axes[0][col]
        ax.axhline(0.0, color="black", lw=0.8)
        late = []  # the differences past the first quarter set the scale: early ones are large and noisy
        for i, (run, ref, spread, c) in enumerate(curves):
            if not c[key]:
                continue
            x, d, se = (np.array(v) for v in zip(*c[key], strict=True))
            label = f"{run.name} - {ref.name}" + (" (seed spread)" if spread else "")
            if spread:  # one grey per further dense seed
                legend[label], = ax.plot(x, d, ls="--", color=str(0.25 + 0.5 * i / len(curves)), lw=1)
            else:
                legend[label], = ax.plot(x, d, marker="o", ms=3, color=f"C{i}")
                ax.fill_between(x, d - 2 * se, d + 2 * se, color=f"C{i}", alpha=0.2, lw=0)
            late += list(d[x >= x.max() / 4])
        if late:
            pad = 0.15 * (max(late) - min(late)) + 1e-4
            ax.set_ylim(min(min(late), 0.0) - pad, max(max(late), 0.0) + pad)
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("eval loss difference (nats)")
        ax.set_title("all modalities (weighted)" if key == "loss" else key.split("/", 1)[1])
        ax.grid(alpha=0.3)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("MoT minus the dense run of its seed (band: 2 paired standard errors); dense seeds minus the "
                 "first (dashed)", fontsize=9)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(legend) - 1) // 2), 1, 0.95))
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def _fraction(value: float | None) -> str:
    return "not reached" if value is None else f"{100 * value:.1f}%"


def _band(summary: dict[str, Any]) -> str:
    if not summary["reached"]:
        return f"not reached (0 of {summary['runs']})"
    reached = "" if summary["reached"] == summary["runs"] else f", {summary['reached']} of {summary['runs']}"
    return f"{100 * summary['mean']:.1f}% ({100 * summary['min']:.1f}-{100 * summary['max']:.1f}%{reached})"


def same_batches(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two evaluation rows log per-micro-batch sums over the same micro-batches (equal counts)."""
    ma, mb = a.get("micro_batches"), b.get("micro_batches")
    return bool(ma) and bool(mb) and ma["counts"] == mb["counts"]


def final_rows(run: RunCurves, reference: RunCurves) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The final evaluation rows of a run and of its reference, and their kind: both final_eval rows (the
    larger held-out set) where both runs have one over the same micro-batches, else both last eval rows."""
    if run.final_eval is not None and reference.final_eval is not None and same_batches(run.final_eval,
                                                                                          reference.final_eval):
        return run.final_eval, reference.final_eval, "final_eval"
    return run.evals[-1], reference.evals[-1], "eval"


def held_out_tokens(row: dict[str, Any]) -> int | None:
    """The predictions an evaluation row averages over, all modalities (its micro-batches' counts, else its
    tokens/NAME counts); None if it logs neither."""
    if row.get("micro_batches"):
        return int(sum(sum(c) for c in row["micro_batches"]["counts"]))
    counts = [v for k, v in row.items() if k.startswith("tokens/")]
    return int(sum(counts)) if counts else None


def held_out_set(row: dict[str, Any], kind: str) -> dict[str, Any]:
    """Which evaluation a table's figures come from: the row kind ("final_eval" or "eval") and its tokens."""
    return {"rows": kind, "tokens": held_out_tokens(row)}


def losses(row: dict[str, Any], keys: list[str]) -> dict[str, float]:
    return {k: row[k] for k in keys if k in row}


def standard_errors(row: dict[str, Any], keys: list[str]) -> dict[str, float]:
    """The row's finite standard error of each loss key."""
    return {k: row[se_key(k)] for k in keys
            if isinstance(row.get(se_key(k)), float) and math.isfinite(row[se_key(k)])}


def paired_difference(run: RunCurves, reference: RunCurves, keys: list[str]) -> dict[str, dict[str, float]]:
    """Per loss key: the final loss of `run` minus the reference's, and the standard error of that
    difference from their per-micro-batch sums (mot.stats: the runs were evaluated on the same held-out
    batches, so most of each one's sampling error cancels); over their final_eval rows where both have
    matching ones, else their last eval rows (`final_rows`). {} where either row lacks the sums or the
    batches differ (another held-out set)."""
    row, ref_row, _ = final_rows(run, reference)
    return rows_difference(run, row, ref_row, keys)


def rows_difference(run: RunCurves, row: dict[str, Any], ref_row: dict[str, Any], keys: list[str]
                    ) -> dict[str, dict[str, float]]:
    """`paired_difference` of two given evaluation rows (the run's and its reference's, same held-out batches)."""
    if not same_batches(row, ref_row):
        return {}
    a, b = row["micro_batches"], ref_row["micro_batches"]
    names = run.modalities
    weights = [m.get("loss_weight", 1.0) for m in run.model_modalities] if run.model_modalities else [1.0] * len(names)
    out = {}
    for key in keys:
        if key == "loss":
            if run.diffusion:  # the reported loss is not one ratio
                continue
            diffs = [sum(w * (x - y) for w, x, y in zip(weights, sa, sb, strict=True))
                     for sa, sb in zip(a["sums"], b["sums"], strict=True)]
            counts = [sum(c) for c in a["counts"]]
        else:
            i = names.index(key.split("/", 1)[1])
            diffs = [sa[i] - sb[i] for sa, sb in zip(a["sums"], b["sums"], strict=True)]
            counts = [c[i] for c in a["counts"]]
        if key in row and key in ref_row and sum(counts) > 0:
            se = ratio_standard_error(diffs, counts)
            if math.isfinite(se):
                out[key] = {"difference": row[key] - ref_row[key], "se": se}
    return out


def difference_curves(run: RunCurves, reference: RunCurves, keys: list[str]
                      ) -> dict[str, list[tuple[float, float, float]]]:
    """Per loss key, (training FLOPs, run minus reference eval loss, its paired standard error) at every step
    both evaluated on the same batches: how the gap between two runs grows, with its noise."""
    by_step = {row["step"]: row for row in reference.evals}
    out: dict[str, list[tuple[float, float, float]]] = {key: [] for key in keys}
    for row in run.evals:
        ref_row = by_step.get(row["step"])
        if ref_row is None or row.get("flops") is None:
            continue
        for key, d in rows_difference(run, row, ref_row, keys).items():
            out[key].append((row["flops"], d["difference"], d["se"]))
    return out


def se_key(key: str) -> str:
    """The eval row's standard error of a loss key: loss -> se, loss/text -> se/text."""
    return "se" + key[4:]


HELD_OUT_SETS = ("Held-out set: final_eval, the larger evaluation of the last step (train.final_eval_batches), "
                 "where the run and its dense run both have one over the same micro-batches; else eval, the last "
                 "periodic evaluation. Tokens: the predictions it averages over, all modalities.")


def _held_out(used: dict[str, Any] | None) -> str:
    if not used:
        return "-"
    return used["rows"] + ("" if used["tokens"] is None else f" ({used['tokens']:,} tokens)")


def markdown_table(report: dict[str, Any], keys: list[str]) -> str:
    names = ["all" if k == "loss" else k.split("/", 1)[1] for k in keys]
    lines = [
        "Fraction = share of the dense run's (same seed) training FLOPs, or wall-clock of its training steps with "
        "the warm-up taken out, at which a run first reaches the dense run's final eval loss (linear "
        "interpolation between evaluations). Warm-up: step time beyond the run's steady step time (compile, "
        "graph capture); start-up, data preparation and evaluations are outside the wall-clock.",
        "",
        "| run | kind | seed | steps | training FLOPs | " + " | ".join(f"final eval {n}" for n in names)
        + " | " + " | ".join(f"FLOPs to match, {n}" for n in names)
        + " | " + " | ".join(f"wall to match, {n}" for n in names) + " | steady step ratio | warm-up s |",
        "|---" * (7 + 3 * len(keys)) + "|",
    ]
    for run in report["runs"]:
        finals = [f"{run['final_eval'][k]:.4f}" if k in run["final_eval"] else "-" for k in keys]
        columns = []
        for field in ("flops_fraction_to_match_reference", "wall_fraction_to_match_reference"):
            fractions = run.get(field)
            columns += [_fraction(fractions.get(k)) if fractions and k in fractions else "-" for k in keys]
        ratio = run.get("steady_step_ratio")
        warmup = run.get("warmup_s")
        lines.append(f"| {run['name']} | {'dense' if run['dense'] else 'MoT'} | {run['seed']} | {run['steps']} | "
                     f"{run['flops']:.3g} | " + " | ".join(finals + columns) + " | "
                     f"{'-' if ratio is None else f'{ratio:.3f}'} | {'-' if warmup is None else f'{warmup:.1f}'} |")
    noise = [run for run in report["runs"] if run.get("final_eval_se")]
    if noise:
        lines += ["", "Evaluation noise: each final eval loss +- its standard error, the evaluation's "
                  "micro-batches as clusters (two held-out sets of this size differ by about 1.4 se; the runs "
                  "share one set, so their differences vary less). " + HELD_OUT_SETS, "",
                  "| run | " + " | ".join(f"{n} +- se" for n in names) + " | held-out set |",
                  "|---" * (2 + len(keys)) + "|"]
        for run in noise:
            loss = run.get("final_eval_se_loss", {})
            lines.append(f"| {run['name']} | " + " | ".join(
                (f"{loss[k]:.4f} +- " if k in loss else "") + f"{run['final_eval_se'][k]:.4f}"
                if k in run["final_eval_se"] else "-" for k in keys)
                + f" | {_held_out(run.get('final_eval_se_from'))} |")
    paired = [run for run in report["runs"] if run.get("final_eval_difference")]
    if paired:
        lines += ["", "Final eval loss minus the dense run's (same seed), +- the standard error of the difference "
                  "(paired: both runs were evaluated on the same held-out batches). " + HELD_OUT_SETS, "",
                  "| run | " + " | ".join(names) + " | held-out set |", "|---" * (2 + len(keys)) + "|"]
        for run in paired:
            cells = [f"{run['final_eval_difference'][k]['difference']:+.4f} +- "
                     f"{run['final_eval_difference'][k]['se']:.4f}" if k in run["final_eval_difference"] else "-"
                     for k in keys]
            lines.append(f"| {run['name']} | " + " | ".join(cells)
                         + f" | {_held_out(run.get('final_eval_difference_from'))} |")
    for group in report.get("bands", []):
        if len(group["seeds"]) < 2:
            continue
        lines += ["", f"Over seeds {group['seeds']} (untie {group['untie']}): mean (min-max) of the MoT runs",
                  "", "| measure | " + " | ".join(names) + " |", "|---" * (1 + len(keys)) + "|"]
        for label, field in (("FLOPs to match", "flops_fraction"), ("wall to match", "wall_fraction")):
            lines.append(f"| {label} | " + " | ".join(_band(group[field][k]) for k in keys) + " |")
        ratio = group["steady_step_ratio"]
        if ratio["reached"]:
            lines.append(f"| steady step ratio | {ratio['mean']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})"
                         + " |" * len(keys))
    return "\n".join(lines) + "\n"
