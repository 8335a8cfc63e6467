"""Training-loss curves read back from `mot train`'s progress bars, for runs whose log.jsonl was lost.

    python docs/results/scaling/progress_curves.py LOG.gz [LOG.gz ...] [--log-every 20] [--tail 10] [--json OUT]
                                                   [--png OUT]

The 2026-12-03 H200 runs of recipes/scaling/scenes_10m.toml lost their run folders with the GPU machine (it was
released between calls), so their log.jsonl and evaluations are gone; only the command's output came back. Each
progress bar line carries the last logged window's losses (`text=... image=...`, one window per `--log-every`
steps). This reads every run's windows from those lines: a window's value first appears at the step that logged
it, so its step is the first bar step carrying it, rounded down to a multiple of `log_every`.

On one epoch of unique data a window's training loss is measured on tokens the model had not yet trained on
(progressive validation), so it estimates the held-out loss at that step; it is noisier than the recipe's
evaluation (1.3M tokens per window here, 1.05M per evaluation, but the window also spans 20 steps of training).

Step fraction to match = FLOPs fraction to match, since the dense and MoT runs of a recipe spend the same FLOPs
per step. The target is the dense run's mean over its last `--tail` windows; the MoT step is the first window
whose trailing mean over `--tail` windows reaches it, interpolated linearly between windows. A dense and a MoT
run of one seed read the same batches in the same order, so their difference window by window (the plot's
lower panels) is paired: it has far less noise than either curve.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

BAR = re.compile(r"(?P<run>[\w.-]+):\s+\d+%\|[^|]*\|\s*(?P<step>\d+)/(?P<steps>\d+) \[[^\]]*?"
                 r"(?P<post>(?:, [\w/]+=(?:[\d.]+|nan|inf)%?)+)\]")
FIELD = re.compile(r", ([\w/]+)=([\d.]+|nan|inf)")


def read_windows(paths: list[Path], log_every: int) -> dict[str, dict[int, dict[str, float]]]:
    """run -> {window step: {field: value}} from every bar line of the logs (in order)."""
    runs: dict[str, dict[int, dict[str, float]]] = {}
    last: dict[str, tuple] = {}
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", errors="replace") as fh:
            text = fh.read().replace("\r", "\n")
        for line in text.splitlines():
            match = BAR.search(line)
            if not match:
                continue
            fields = {k: float(v) for k, v in FIELD.findall(match["post"]) if k not in ("mfu",)}
            key = tuple(sorted(fields.items()))
            run, step = match["run"], int(match["step"])
            if last.get(run) == key or "text" not in fields:
                continue
            last[run] = key
            # a window first shows at or after the step that logged it; the first to claim a step keeps it (a
            # run stopped between log steps shows its partial window last, rounded onto a full one)
            runs.setdefault(run, {}).setdefault(step - step % log_every, fields)
    return runs


def trailing_mean(values: list[float], n: int) -> list[float]:
    return [sum(values[max(0, i - n + 1):i + 1]) / len(values[max(0, i - n + 1):i + 1]) for i in range(len(values))]


def step_to_reach(steps: list[int], values: list[float], target: float, n: int) -> float | None:
    smooth = trailing_mean(values, n)
    for i in range(1, len(smooth)):
        if smooth[i] <= target < smooth[i - 1]:
            a, b = smooth[i - 1], smooth[i]
            return steps[i - 1] + (steps[i] - steps[i - 1]) * (a - target) / (a - b)
    return None


def plot(runs: dict[str, dict[int, dict[str, float]]], tail: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for col, key in enumerate(("text", "image")):
        for name in sorted(runs):
            steps = sorted(runs[name])
            axes[0, col].plot(steps, trailing_mean([runs[name][s][key] for s in steps], tail), label=name,
                              linestyle="-" if "-mot" in name else "--")
            dense = name.replace("-mot", "-dense")
            if "-mot" in name and dense in runs:
                both = [s for s in steps if s in runs[dense]]
                diff = [runs[name][s][key] - runs[dense][s][key] for s in both]
                axes[1, col].plot(both, diff, label=f"{name} - {dense}", linewidth=0.8)
        axes[0, col].set(title=f"{key}: training loss per window (trailing mean of {tail})", ylabel="nats")
        axes[0, col].set_ylim(top=min(axes[0, col].get_ylim()[1], 1.0 if key == "text" else 3.0))
        axes[1, col].axhline(0, color="black", linewidth=0.5)
        axes[1, col].set(title=f"{key}: MoT minus dense, same batches (one window each)", xlabel="step",
                         ylabel="nats")
        axes[1, col].set_ylim(-0.04, 0.02)
        axes[0, col].legend(fontsize=8)
        axes[1, col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--tail", type=int, default=10, help="windows averaged for the target and the match")
    parser.add_argument("--json", default="")
    parser.add_argument("--png", default="", help="the curves and the paired differences")
    args = parser.parse_args()
    runs = read_windows(args.logs, args.log_every)
    report: dict = {"runs": {}, "matches": []}
    print(f"{'run':24} {'windows':>7} {'first':>6} {'last':>6}  final mean of {args.tail} windows (text / image)  "
          "tokens/s (median)")
    for name, windows in sorted(runs.items()):
        steps = sorted(windows)
        tail = steps[-args.tail:]
        final = {k: sum(windows[s][k] for s in tail) / len(tail) for k in ("text", "image")}
        speeds = sorted(windows[s]["tok/s"] for s in steps[len(steps) // 4:])  # past the warm-up
        report["runs"][name] = {"windows": len(steps), "first_step": steps[0], "last_step": steps[-1],
                                "final": final, "tokens_per_s_median": speeds[len(speeds) // 2],
                                "curve": {s: windows[s] for s in steps}}
        print(f"{name:24} {len(steps):7d} {steps[0]:6d} {steps[-1]:6d}  {final['text']:.4f} / {final['image']:.4f}"
              f"  {speeds[len(speeds) // 2]:,.0f}")
    for name in sorted(runs):
        if "-mot" not in name:
            continue
        dense = name.replace("-mot", "-dense")
        if dense not in runs:
            continue
        d, m = report["runs"][dense], runs[name]
        steps = sorted(m)
        for key in ("text", "image"):
            target = d["final"][key]
            at = step_to_reach(steps, [m[s][key] for s in steps], target, args.tail)
            fraction = None if at is None else at / d["last_step"]
            report["matches"].append({"mot": name, "dense": dense, "modality": key, "target": target,
                                      "mot_step": at, "fraction": fraction})
            shown = "not reached" if at is None else f"step {at:.0f} = {100 * fraction:.1f}%"
            print(f"{name} reaches {dense}'s final {key} loss {target:.4f}: {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.png:
        plot(runs, args.tail, Path(args.png))


if __name__ == "__main__":
    main()
