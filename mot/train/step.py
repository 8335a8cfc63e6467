"""One optimizer step over a `TrainState`, and an evaluation: what `mot train` repeats and bench/step.py times.

    update(state)          # train_step (accum micro-batches, forward and backward), then the AdamW step unless
                           # the losses or gradient norm are not finite (train.on_nonfinite), then the schedule
    evaluate(state)        # the held-out loss per modality, the same batches every time
    evaluate(state, n)     # over the first n global batches of that stream (the final, larger evaluation)

The loss that is back-propagated is the objective's (mot/objectives/training.py); DDP/FSDP's gradient averaging
makes it the mean over all processes.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from mot import runs
from mot.data.loader import PackedBatch
from mot.flops import attention_flops
from mot.objectives.latents import LatentBatch
from mot.stats import ratio_standard_error
from mot.train.data import RankSlice
from mot.train.errors import NonFiniteError
from mot.train.metrics_log import MetricsLog
from mot.train.optim import clip_gradients
from mot.train.routing_check import check_routing
from mot.train.sharding import keep_gathered
from mot.train.state import TrainState


@dataclass
class Update:
    """What one optimizer step gave: per-modality loss sums and counts over all processes (host tensors), the
    weighted loss, the gradient norm before clipping, the learning rate it ran at, and whether it was applied."""
    loss_sum: torch.Tensor
    count: torch.Tensor
    weighted: float
    grad_norm: float
    lr: float
    applied: bool


def per_modality(names: list[str], loss_sum: torch.Tensor, count: torch.Tensor, prefix: str = "loss/") -> dict:
    return {f"{prefix}{n}": (loss_sum[i] / count[i]).item() for i, n in enumerate(names) if count[i] > 0}


def device_batch(state: TrainState, batch: PackedBatch) -> PackedBatch | LatentBatch:
    """A loader batch ready for the model, on the device (the objective's host work done first)."""
    return state.objective.host_batch(batch).to(state.accelerator.device, non_blocking=True)


def micro_batch_losses(state: TrainState, batch: PackedBatch | LatentBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-modality loss sums and prediction counts of one micro-batch on the device."""
    flex = state.flex and batch.document_ids.is_cuda  # FlexAttention's backward has no CPU kernel
    return state.objective.losses(state.model, batch, state.objective.mask(batch, flex))


def train_step(state: TrainState) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Forward and backward of `accum` micro-batches, each drawn new from the loader, then the gradient clip.
    Returns the per-modality loss sums and counts over all processes, the weighted loss and the gradient norm
    (before clipping); sets state.step_flops (attention under each micro-batch's document mask)."""
    acc, objective, n = state.accelerator, state.objective, len(state.names)
    predictions = state.accum * state.micro * (state.cfg.train.seq_len - 1)
    loss_sum = torch.zeros(n, device=acc.device)
    count = torch.zeros(n, device=acc.device)
    pairs = 0
    for micro in range(state.accum):
        batch = objective.host_batch(next(state.train_batches))
        pairs += objective.attention_pairs(batch)  # on the host: no sync
        if state.cfg.train.check_routing:  # the route the step's model builds: host counts, or none in a graph
            checked = batch if state.graph is None else replace(batch, tower_counts=None)
            check_routing(acc.unwrap_model(state.model), checked.to(acc.device), state.step + 1, micro)
        if state.graph is not None:  # forward and backward replayed as one CUDA graph
            micro_sum, micro_count = state.graph(batch)
        else:
            batch = batch.to(acc.device, non_blocking=True)
            # Gradients are all-reduced once, on the last micro-batch.
            sync = nullcontext() if micro == state.accum - 1 else acc.no_sync(state.model)
            if state.sharded and state.cfg.train.fsdp_keep_gathered:
                keep_gathered(state.model, micro, state.accum)
            with sync:
                micro_sum, micro_count = micro_batch_losses(state, batch)
                acc.backward(objective.backward_scalar(micro_sum, micro_count, predictions, state.accum))
        if state.master_weights and micro < state.accum - 1:
            state.inner_optimizer.stash_gradients()  # fp32 sums of the other bf16 gradients
        loss_sum += micro_sum.detach()
        count += micro_count
    if state.freezer is not None:  # before the norm: it is the trainable part's
        state.freezer.mask_gradients(state.inner_optimizer)
    clip = state.cfg.train.grad_clip or math.inf
    if state.sharded:  # DTensor gradients: accelerate's DTensor-aware clip
        grad_norm = acc.clip_grad_norm_(state.model.parameters(), clip)
    else:  # folded into the fused AdamW step (the same on every process)
        grad_norm = clip_gradients(state.inner_optimizer, state.model.parameters(), clip)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    totals = acc.reduce(torch.cat([loss_sum, count]), reduction="sum")
    totals = torch.cat([totals, grad_norm.detach().reshape(1).float()]).cpu()  # the step's one host sync
    loss_sum, count, grad_norm = totals[:n], totals[n : 2 * n], float(totals[-1])
    if acc.num_processes > 1:  # every process's rows of the global batch
        pairs = int(acc.reduce(torch.tensor([pairs], dtype=torch.int64, device=acc.device), reduction="sum"))
    state.step_flops = state.tokens_per_step * state.projection_flops + 3 * attention_flops(state.cfg.model, pairs)
    return loss_sum, count, objective.weighted(loss_sum, count), grad_norm


def non_finite(state: TrainState, loss_sum: torch.Tensor, count: torch.Tensor, grad_norm: float) -> str | None:
    """What is not finite in a step's results, or None."""
    bad = [n for i, n in enumerate(state.names) if not math.isfinite(float(loss_sum[i]))]
    if bad:
        losses = per_modality(state.names, loss_sum, count, prefix="")
        shown = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
        return f"step {state.step + 1}: non-finite loss for modality {', '.join(bad)} ({shown})"
    if not math.isfinite(grad_norm):
        return f"step {state.step + 1}: non-finite gradient norm ({grad_norm}) with finite losses"
    return None


def skip_or_stop(state: TrainState, problem: str, log: MetricsLog | None) -> None:
    """train.on_nonfinite: "skip" drops the update (up to train.max_skipped_steps in a row), "stop" raises."""
    t = state.cfg.train
    last = runs.latest_checkpoint(state.run_dir / "checkpoints")
    if log is not None:
        log.write("error", state.step + 1, {"message": problem})
    state.skipped += 1
    state.skipped_in_row += 1
    if t.on_nonfinite == "stop" or state.skipped_in_row > t.max_skipped_steps:
        why = "" if t.on_nonfinite == "stop" else f" ({state.skipped_in_row} updates in a row skipped)"
        raise NonFiniteError(f"{problem}{why}. Training stopped; the last checkpoint "
                             f"({last or 'none yet'}) is untouched. Set train.on_nonfinite='skip' to drop "
                             "such updates instead.")
    tqdm.write(f"mot: {problem}: update skipped")


def update(state: TrainState, log: MetricsLog | None = None) -> Update:
    """One optimizer step as `mot train` takes it: `train_step`, the update unless something is not finite, the
    schedule, the counters."""
    loss_sum, count, weighted, grad_norm = train_step(state)
    problem = non_finite(state, loss_sum, count, grad_norm)
    if problem is None:
        if state.freezer is not None:
            state.freezer.decay(state.inner_optimizer)
        state.optimizer.step()
        state.skipped_in_row = 0
    else:
        skip_or_stop(state, problem, log)
    lr = state.scheduler.get_last_lr()[0]
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens_seen += state.tokens_per_step
    state.flops_seen += state.step_flops
    return Update(loss_sum, count, weighted, grad_norm, lr, applied=problem is None)


def held_out_batches(state: TrainState) -> int:
    """Whole global batches (train.batch_size sequences) the held-out set holds before an evaluation would
    read it again; 0 without one."""
    if state.eval_loader is None:
        return 0
    t = state.cfg.train
    return state.eval_loader.tokens_per_epoch // (t.batch_size * t.seq_len)


def held_out_repeated(state: TrainState) -> bool:
    """Whether the last evaluation ran past the end of the held-out set (the loader started it again)."""
    return state.eval_loader is not None and state.eval_loader.epoch != state.eval_start["epoch"]


@torch.no_grad()
def evaluate(state: TrainState, batches: int | None = None) -> dict[str, float]:
    """Loss, per-modality loss and perplexity, and token counts over the first `batches` global batches of the
    held-out stream (default train.eval_batches; {} without a held-out set or batches). Every evaluation starts
    at the stream's start, so a larger one reads the smaller one's batches first.

    `se` and `se/NAME`: the standard errors of those losses with the micro-batches as clusters
    (`mot.stats.ratio_standard_error`): the spread of the loss over held-out sets of this size (two such sets
    differ by about 1.4 se). The micro-batches are consecutive slices of the held-out stream, so where
    neighbouring documents are alike this underestimates it. `micro_batches`: their per-modality sums and
    counts, for a paired comparison with another run (`mot compare`). Left out with fewer than 2
    micro-batches, and when the held-out set ran out and its batches repeat (the loader started it again)."""
    batches = state.cfg.train.eval_batches if batches is None else batches
    if state.eval_loader is None or batches == 0:
        return {}
    acc, n = state.accelerator, len(state.names)
    state.eval_loader.load_state_dict(state.eval_start)  # the same held-out batches every time
    rows = RankSlice(state.eval_loader, acc.process_index, acc.num_processes)
    per_batch = []
    state.model.eval()
    for _ in range(batches * state.accum):  # the same sequences on any device count
        s, c = micro_batch_losses(state, device_batch(state, next(rows)))
        per_batch.append(torch.cat([s.detach().float(), c.float()]))
    state.model.train()
    per_batch = acc.gather(torch.stack(per_batch)).cpu().double()  # (micro-batches of every process, 2n)
    sums, counts = per_batch[:, :n], per_batch[:, n:]
    loss_sum, count = sums.sum(0), counts.sum(0)
    out = {"loss": state.objective.weighted(loss_sum, count)}
    out.update(per_modality(state.names, loss_sum, count))
    if len(per_batch) >= 2 and not held_out_repeated(state):  # distinct micro-batches
        if state.objective.weighted_is_a_ratio:
            weights = state.objective.loss_weights.cpu().double()
            out["se"] = ratio_standard_error((sums * weights).sum(1).tolist(), counts.sum(1).tolist())
        out.update({f"se/{name}": ratio_standard_error(sums[:, i].tolist(), counts[:, i].tolist())
                    for i, name in enumerate(state.names) if float(count[i]) > 0})
        # per micro-batch and modality: another run on the same batches gets a paired standard error (compare)
        out["micro_batches"] = {"sums": sums.tolist(), "counts": counts.tolist()}
    diffusion = {m.name for m in state.cfg.model.modalities if m.is_diffusion}  # a squared error has no ppl
    out.update({f"ppl/{k[5:]}": math.exp(min(v, 50.0)) for k, v in list(out.items())
                if k.startswith("loss/") and k[5:] not in diffusion})
    out.update({f"tokens/{state.names[i]}": int(count[i]) for i in range(n)})
    return out
