"""Where training metrics go: a JSONL log (the record), TensorBoard event files, and a PNG of the curves.

Each JSONL row is one event: {"kind": "train"|"eval"|"final_eval", "step": ..., "loss": ..., "loss/text": ...,
...} ("final_eval": the larger evaluation of the last step, train.final_eval_batches).
`mot compare` and the plot read this file; nothing needs recomputing after the run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int = 0):
        self.path = run_dir / "log.jsonl"
        if resume_step and self.path.exists():
            self._truncate_after(resume_step)
        self.file = open(self.path, "a", buffering=1)  # noqa: SIM115  (line-buffered: a killed run keeps its rows)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop rows a crashed run wrote after its last checkpoint: they are about to be redone."""
        rows = read_log(self.path)
        kept = [r for r in rows if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        row = {"kind": kind, "step": step, **values}
        self.file.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a log.jsonl; a torn last line (a killed run) is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss_curves(log_path: str | Path, out_png: str | Path, title: str = "") -> Path:
    """One panel per modality (and the total): train loss and eval loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("loss/")))  # recipe order
    panels = ["loss", *keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        for kind, style in (("train", {"lw": 1.0, "alpha": 0.8}), ("eval", {"marker": "o", "ms": 4, "lw": 1.5})):
            points = [(r["step"], r[key]) for r in rows if r["kind"] == kind and r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), label=kind, **style)
        ax.set_title("total (weighted)" if key == "loss" else key.split("/", 1)[1])
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
