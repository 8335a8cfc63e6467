"""`mot train`: a run built from its config, resumed from a checkpoint if asked, then trained.

    result = train(load_config("recipes/demo.toml"), resume=None)

The parts, each a module of mot/train/: `state` builds the model, optimizer, schedule, objective and loaders
into a `TrainState`; `step` is one optimizer step (`update`, over `train_step`) and the evaluation; `loop` the
cadence of logs, evaluations and checkpoints; `state_io` saves and restores the state (in the folders of
`checkpoint`). `Trainer` holds a state and offers those as methods, for the command, the tests and
bench/step.py.
"""

from __future__ import annotations

from pathlib import Path

from mot.config import RunConfig
from mot.train import loop, state_io, step
from mot.train.loop import TrainResult
from mot.train.metrics_log import MetricsLog
from mot.train.state import TrainState, build_state

__all__ = ["TrainResult", "Trainer", "train"]


class Trainer:
    def __init__(self, cfg: RunConfig, where: str = "recipe", resume: str | bool | None = None,
                 overwrite: bool = False, progress: bool = True, init_from: str | None = None):
        self.state: TrainState
        self.state, resume_from = build_state(cfg, where, resume, overwrite, init_from)
        self.progress = progress
        if resume_from is not None:
            state_io.load_state(self.state, resume_from)

    def update(self, log: MetricsLog | None = None) -> step.Update:
        """One optimizer step, as `fit` takes it (bench/step.py times this)."""
        return step.update(self.state, log)

    def evaluate(self, batches: int | None = None) -> dict[str, float]:
        """The held-out losses over `batches` global batches (default train.eval_batches)."""
        return step.evaluate(self.state, batches)

    def save(self) -> Path | None:
        return state_io.save_state(self.state)

    def fit(self, until: int | None = None) -> TrainResult:
        """Train up to step `until` (default train.steps; the schedule always spans train.steps)."""
        return loop.fit(self.state, until, self.progress)


def train(cfg: RunConfig, where: str = "recipe", resume: str | bool | None = None, overwrite: bool = False,
          progress: bool = True, init_from: str | None = None) -> TrainResult:
    return Trainer(cfg, where, resume, overwrite, progress, init_from).fit()
