"""MoT against dense as the paper measures it: eval loss against training FLOPs per modality, and the
fraction of the dense run's FLOPs at which the MoT run first reaches the dense run's final eval loss.

    report = compare_runs(["runs/x-dense", "runs/x-mot"], out_dir="runs/x-compare")

Reads each run's `log.jsonl` (eval rows carry cumulative training FLOPs and wall time, so nothing is
recomputed) and `config.json`. The reference is the run whose model has nothing untied (or the first run).
The crossing is interpolated linearly in FLOPs between the two evaluations around it; an eval curve that
never gets down to the dense loss is "not reached".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    def curve(self, key: str, x: str = "flops") -> list[tuple[float, float]]:
        return [(row[x], row[key]) for row in self.evals if row.get(key) is not None]


def load_run(folder: str | Path) -> RunCurves:
    folder = Path(folder)
    log, config = folder / "log.jsonl", folder / "config.json"
    if not log.is_file() or not config.is_file():
        raise CompareError(f"{folder}: not a run folder (needs log.jsonl and config.json written by `mot train`)")
    cfg = json.loads(config.read_text())
    evals = sorted((r for r in read_log(log) if r["kind"] == "eval"), key=lambda r: r["step"])
    if not evals:
        raise CompareError(f"{folder}: the log holds no evaluation; train with data.eval_fraction > 0")
    modalities = [m["name"] for m in cfg["model"]["modalities"]]
    dense = not cfg["model"]["untie"] or len(modalities) == 1
    return RunCurves(cfg.get("name", folder.name), folder, dense, modalities, evals)


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


def matching_fractions(reference: RunCurves, other: RunCurves, keys: list[str]) -> dict[str, float | None]:
    """Per key: the fraction of the reference's total FLOPs at which `other` reaches its final loss."""
    total = reference.evals[-1]["flops"]
    out = {}
    for key in keys:
        ref = reference.curve(key)
        if not ref:
            continue
        reached = flops_to_reach(other.curve(key), ref[-1][1])
        out[key] = None if reached is None else reached / total
    return out


def _plot(runs: list[RunCurves], keys: list[str], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 6.4), squeeze=False)
    for col, key in enumerate(keys):
        for row, (x, label) in enumerate((("flops", "training FLOPs"), ("wall_s", "wall-clock (s)"))):
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
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def compare_runs(folders: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Write compare.png, compare.md and compare.json into out_dir; return the JSON report."""
    runs = [load_run(f) for f in folders]
    if len(runs) < 2:
        raise CompareError("compare needs at least two run folders")
    reference = next((r for r in runs if r.dense), runs[0])
    keys = ["loss", *(f"loss/{m}" for m in reference.modalities)]
    report: dict[str, Any] = {"reference": reference.name, "reference_dense": reference.dense, "keys": keys,
                              "runs": []}
    for run in runs:
        final = run.evals[-1]
        entry = {
            "name": run.name, "folder": str(run.folder), "dense": run.dense, "steps": final["step"],
            "flops": final["flops"], "wall_s": final.get("wall_s"),
            "final_eval": {k: final[k] for k in keys if k in final},
        }
        if run is not reference:
            entry["flops_fraction_to_match_reference"] = matching_fractions(reference, run, keys)
        report["runs"].append(entry)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot(runs, keys, out / "compare.png")
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    (out / "compare.md").write_text(markdown_table(report, keys))
    return report


def _fraction(value: float | None) -> str:
    return "not reached" if value is None else f"{100 * value:.1f}%"


def markdown_table(report: dict[str, Any], keys: list[str]) -> str:
    names = ["all" if k == "loss" else k.split("/", 1)[1] for k in keys]
    lines = [
        f"Reference: {report['reference']}{' (dense)' if report.get('reference_dense') else ''}. Fraction = share "
        "of the reference's training FLOPs at which a run first reaches the reference's final eval loss (linear "
        "interpolation between evaluations).",
        "",
        "| run | kind | steps | training FLOPs | " + " | ".join(f"final eval {n}" for n in names)
        + " | " + " | ".join(f"FLOPs to match, {n}" for n in names) + " |",
        "|---" * (4 + 2 * len(keys)) + "|",
    ]
    for run in report["runs"]:
        finals = [f"{run['final_eval'][k]:.4f}" if k in run["final_eval"] else "-" for k in keys]
        fractions = run.get("flops_fraction_to_match_reference")
        matched = [_fraction(fractions.get(k)) if fractions and k in fractions else "-" for k in keys]
        lines.append(f"| {run['name']} | {'dense' if run['dense'] else 'MoT'} | {run['steps']} | "
                     f"{run['flops']:.3g} | " + " | ".join(finals) + " | " + " | ".join(matched) + " |")
    return "\n".join(lines) + "\n"
