"""The training loop's cadence: a step, then on schedule a log row, an evaluation, a checkpoint; the plot and
summary.json at the end.

    result = fit(state)    # up to train.steps (the schedule always spans train.steps)

SIGINT or SIGTERM (`timeout -s INT`, a job scheduler's notice) stops the loop after the step in flight, with a
checkpoint and the summary written, then raises `TrainingStopped`: `mot train --resume` continues on the same
curve. A second signal stops at once. With several processes they agree at the next log step.

At the last step, train.final_eval_batches > 0 adds a larger evaluation after the periodic one: a "final_eval"
row (the fields of an "eval" row, over more held-out batches that start with the periodic ones), for final
losses with smaller standard errors. A stop by a signal is not the last step, and a finished run resumed does
not evaluate again.

A log row (log.jsonl, TensorBoard) averages the steps since the last one: weighted and per-modality loss,
learning rate, gradient norm, tokens/s, step time, MFU on a GPU (the steps' FLOPs with attention under each
batch's document mask; `mfu_full_causal` counts attention over the whole row) and the run's counters.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mot.train.errors import TrainingStopped
from mot.train.metrics_log import MetricsLog, plot_loss_curves
from mot.train.state import TrainState
from mot.train.state_io import save_state
from mot.train.step import evaluate, held_out_batches, held_out_repeated, per_modality, update


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: dict[str, float]  # last logged window, per modality (and "loss", the weighted total)
    eval_loss: dict[str, float] = field(default_factory=dict)
    final_eval: dict[str, float] = field(default_factory=dict)  # losses and se's of the final_eval row, if any
    checkpoint: Path | None = None
    plot: Path | None = None
    losses: list[float] = field(default_factory=list)  # weighted loss of every step this process ran
    skipped_steps: int = 0
    stopped_by: int | None = None  # the signal that stopped the run before `until` (see StopSignal)


class Window:
    """Sums over the steps since the last log line."""

    def __init__(self, n_modalities: int):
        self.loss_sum = torch.zeros(n_modalities, dtype=torch.float64)
        self.count = torch.zeros(n_modalities, dtype=torch.float64)
        self.weighted, self.steps, self.tokens, self.seconds, self.flops = 0.0, 0, 0, 0.0, 0.0

    def add(self, loss_sum: torch.Tensor, count: torch.Tensor, weighted: float, tokens: int, seconds: float,
            flops: float):
        self.loss_sum += loss_sum.double()
        self.count += count.double()
        self.weighted += weighted
        self.steps, self.tokens, self.seconds = self.steps + 1, self.tokens + tokens, self.seconds + seconds
        self.flops += flops


def counters(state: TrainState) -> dict[str, float]:
    return {"tokens": state.tokens_seen, "flops": state.flops_seen, "wall_s": round(state.wall_s, 3)}


def train_row(state: TrainState, window: Window, lr: float, grad_norm: float) -> dict[str, Any]:
    tokens_per_s = window.tokens / window.seconds
    row: dict[str, Any] = {"loss": window.weighted / window.steps}
    row.update(per_modality(state.names, window.loss_sum, window.count))
    row.update({"lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                "step_ms": 1e3 * window.seconds / window.steps, **counters(state)})
    if state.peak:  # per device: the step's FLOPs over every process
        devices = state.peak * state.accelerator.num_processes
        row["mfu"] = window.flops / window.seconds / devices
        row["mfu_full_causal"] = tokens_per_s * state.full_causal_flops_per_token / devices
    return row


def postfix(row: dict[str, Any]) -> dict[str, str]:
    out = {k.split("/", 1)[1]: f"{v:.3f}" for k, v in row.items() if k.startswith("loss/")}
    out["tok/s"] = f"{row['tokens_per_s']:.0f}"
    if "mfu" in row:
        out["mfu"] = f"{100 * row['mfu']:.1f}%"
    return out


class StopSignal:
    """Notes SIGINT / SIGTERM while training runs, so that it can stop between steps; a second one, a second or
    more after the first, raises KeyboardInterrupt (a launcher that forwards the signal it got to its workers
    delivers it twice at once: that counts as one). Nested uses share one note (signals are per process): a
    signal that comes during a run's last step, or between the runs of `mot compare --recipe`, still stops
    what follows. Outside the main thread (a notebook's worker) signals are left alone."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_S = 1.0  # a signal this soon after the first is the same request
    _depth = 0
    _previous: dict[int, Any] = {}
    received: int | None = None
    _received_at = 0.0

    def __enter__(self) -> StopSignal:
        if StopSignal._depth == 0:
            StopSignal.received = None
            if threading.current_thread() is threading.main_thread():
                for sig in self.SIGNALS:
                    previous = signal.signal(sig, StopSignal._note)
                    if previous is not StopSignal._note:  # a handler left behind by an interrupted exit
                        StopSignal._previous[sig] = previous
        StopSignal._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        StopSignal._depth -= 1
        if StopSignal._depth == 0:
            previous, StopSignal._previous = StopSignal._previous, {}
            for sig in self.SIGNALS:
                signal.signal(sig, previous.get(sig, signal.default_int_handler if sig == signal.SIGINT
                                                 else signal.SIG_DFL))

    @staticmethod
    def _note(signum: int, frame) -> None:
        now = time.monotonic()
        if StopSignal.received is None:
            StopSignal.received, StopSignal._received_at = signum, now
        elif now - StopSignal._received_at > StopSignal.REPEAT_S:
            raise KeyboardInterrupt

    def stopped(self, what: str) -> TrainingStopped:
        """The error for a stop noted before `what` began."""
        return TrainingStopped(f"stopped by {signal.Signals(self.received).name} before {what}. "
                               "Continue with --resume.")


def final_evaluation(state: TrainState, log: MetricsLog | None) -> dict[str, float]:
    """The larger evaluation of the last step (train.final_eval_batches), logged as a "final_eval" row; its
    losses and standard errors, for the summary. Every process evaluates; the main one logs."""
    asked = state.cfg.train.final_eval_batches
    evaluation = evaluate(state, asked)
    if held_out_repeated(state) and state.accelerator.is_main_process:
        tqdm.write(f"mot: warning: the held-out set holds {held_out_batches(state)} global batches "
                   f"(train.batch_size x train.seq_len tokens each) but train.final_eval_batches asks for {asked}: "
                   "its batches repeat, so the final_eval row has no standard errors. Raise data.eval_fraction "
                   "or lower train.final_eval_batches.")
    if log is None or not evaluation:
        return {}
    log.write("final_eval", state.step, {**evaluation, **counters(state)})
    return {k: v for k, v in evaluation.items() if k.startswith(("loss", "se"))}


def should_stop(state: TrainState, stop: StopSignal, at_log_step: bool) -> bool:
    """One process: as soon as a signal came. Several: at log steps, if any process got one (a collective, so
    every process stops after the same step)."""
    acc = state.accelerator
    if acc.num_processes == 1:
        return stop.received is not None
    if not at_log_step:
        return False
    flag = torch.tensor([float(stop.received is not None)], device=acc.device)
    return bool(acc.reduce(flag, reduction="sum").item() > 0)


def fit(state: TrainState, until: int | None = None, progress: bool = True) -> TrainResult:
    """Train up to step `until` (default train.steps; the schedule always spans train.steps)."""
    with StopSignal() as stop:
        result = _fit(state, until, progress, stop)
    if result.stopped_by is not None:
        raise TrainingStopped(f"{state.cfg.name}: stopped by {signal.Signals(result.stopped_by).name} after step "
                              f"{result.step} of {state.cfg.train.steps}; checkpoint {result.checkpoint}. "
                              "Continue with --resume.", result)
    return result


def _fit(state: TrainState, until: int | None, progress: bool, stop: StopSignal) -> TrainResult:
    t, acc = state.cfg.train, state.accelerator
    until = t.steps if until is None else min(until, t.steps)
    main = acc.is_main_process
    log = MetricsLog(state.run_dir, t.tensorboard, resume_step=state.step) if main else None
    window = Window(len(state.names))
    result = TrainResult(state.run_dir, state.step, {})
    bar = tqdm(total=t.steps, initial=state.step, desc=state.cfg.name, unit="step", dynamic_ncols=True,
               disable=not (main and progress))
    state.model.train()
    try:
        while state.step < until:
            start = time.perf_counter()
            step = update(state, log)
            seconds = time.perf_counter() - start
            state.wall_s += seconds
            result.losses.append(step.weighted)
            if step.applied:
                window.add(step.loss_sum, step.count, step.weighted, state.tokens_per_step, seconds,
                           state.step_flops)
            bar.update(1)

            final = state.step == until
            log_step = state.step % max(t.log_every, 1) == 0 or final
            stopping = not final and should_stop(state, stop, log_step)
            if main and window.steps and (log_step or stopping):  # a stop logs its partial window
                row = train_row(state, window, step.lr, step.grad_norm)
                log.write("train", state.step, row)
                result.train_loss = {k: v for k, v in row.items() if k.startswith("loss")}
                bar.set_postfix(postfix(row), refresh=False)
                window = Window(len(state.names))
            if final or (t.eval_every and state.step % t.eval_every == 0):
                evaluation = evaluate(state)
                if main and evaluation:
                    log.write("eval", state.step, {**evaluation, **counters(state)})
                    result.eval_loss = {k: v for k, v in evaluation.items() if k.startswith("loss")}
                    plot_loss_curves(log.path, state.run_dir / "loss_curves.png", state.cfg.name)
            if final and state.step == t.steps and t.final_eval_batches:  # not at a fit(until=...) short of it
                result.final_eval = final_evaluation(state, log)
            if final or stopping or (t.checkpoint_every and state.step % t.checkpoint_every == 0):
                result.checkpoint = save_state(state)
            if stopping:
                result.stopped_by = stop.received or signal.SIGTERM  # another process's signal
                break
    finally:
        state.train_batches.close()  # a prefetching thread stops; the loader stays where the steps left it
        bar.close()
        if log is not None:
            log.close()
    if main and (result.losses or not (state.run_dir / "summary.json").is_file()):  # a finished run resumed
        result.plot = plot_loss_curves(state.run_dir / "log.jsonl", state.run_dir / "loss_curves.png",
                                       state.cfg.name)
        summary = {"step": state.step, "steps": t.steps, "train": result.train_loss, "eval": result.eval_loss,
                   "skipped_steps": state.skipped, **counters(state),
                   "checkpoint": str(result.checkpoint), "plot": str(result.plot)}
        if result.final_eval:
            summary["final_eval"] = result.final_eval
        (state.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    result.step, result.skipped_steps = state.step, state.skipped
    return result
