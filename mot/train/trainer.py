"""The training loop: accelerate for devices and precision, AdamW + warm-up/cosine, gradient accumulation,
clipping, per-modality loss weights, held-out evaluation, logging, atomic checkpoints and exact resume.

    result = train(load_config("recipes/demo.toml"), resume=None)

One optimizer step = `accum` micro-batches per process. The loss that is back-propagated is
sum_m w_m * (loss sum over modality-m predictions) / (predictions per process per step), so with all weights
1 it is the plain token mean, and DDP/FSDP's gradient averaging makes it the mean over all processes.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mot import runs
from mot.config import ConfigError, RunConfig, config_to_dict
from mot.data.loader import PackedBatch
from mot.flops import attention_flops, attention_pairs, projection_flops_per_token, size_report
from mot.interop.run_files import carry_interop_files
from mot.model import MoTTransformer
from mot.model.block import MoTBlock
from mot.model.masks import document_block_mask, mixed_block_mask
from mot.objectives.ar import next_token_loss
from mot.objectives.diffusion import add_noise, diffusion_loss
from mot.objectives.latents import LatentBatch, LatentBatcher, load_codecs
from mot.train import checkpoint as ckpt
from mot.train.data import RankSlice, build_loaders, ensure_prepared
from mot.train.errors import NonFiniteError
from mot.train.freeze import Freezer
from mot.train.metrics_log import MetricsLog, plot_loss_curves
from mot.train.optim import build_optimizer, build_scheduler, clip_gradients
from mot.train.sharding import keep_gathered

# Dense bf16 tensor-core peak per device (no sparsity), for MFU.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: dict[str, float]  # last logged window, per modality (and "loss", the weighted total)
    eval_loss: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    plot: Path | None = None
    losses: list[float] = field(default_factory=list)  # weighted loss of every step this process ran
    skipped_steps: int = 0


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


def peak_flops(device: torch.device, configured_tflops: float) -> float | None:
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def _accelerator(cfg: RunConfig):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    t = cfg.train
    cuda = torch.cuda.is_available()
    precision = t.precision if t.precision != "auto" else ("bf16" if cuda else "fp32")
    fsdp = None
    if t.distributed == "fsdp" and PartialState().num_processes > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # bf16 compute, fp32 gradient reduction: accelerate's own bf16 policy reduces in bf16, and FSDP2 then
        # also accumulates a step's micro-batches in bf16 (torchtitan's default reduces in fp32, as here).
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                       output_dtype=torch.bfloat16) if precision == "bf16" else None)
        fsdp = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=[MoTBlock.__name__], reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT", mixed_precision_policy=policy,
        )
    return Accelerator(mixed_precision={"bf16": "bf16", "fp32": "no"}[precision], fsdp_plugin=fsdp, cpu=not cuda)


def _master_weights(cfg: RunConfig, acc, where: str) -> bool:
    """Whether the model computes with bf16 weights and the optimizer keeps fp32 masters (train.master_weights)."""
    wanted = cfg.train.master_weights
    bf16 = acc.mixed_precision == "bf16"
    if wanted == "auto":
        return bf16 and acc.num_processes == 1 and acc.device.type == "cuda"
    if wanted and not bf16:
        raise ConfigError(f"{where}: train.master_weights needs bf16 precision (set train.precision = 'bf16')")
    if wanted and acc.num_processes > 1:
        raise ConfigError(f"{where}: train.master_weights runs on one process; with {acc.num_processes} processes "
                          "set it to false or 'auto' (under FSDP the bf16 policy casts once per shard)")
    return bool(wanted)


def _batch_shape(cfg: RunConfig, world_size: int, where: str) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) so that micro * world * accum = batch_size."""
    t = cfg.train
    micro = t.micro_batch_size or max(1, t.batch_size // world_size)
    if t.batch_size % (micro * world_size):
        raise ConfigError(f"{where}: train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size "
                          f"({micro}) x processes ({world_size})")
    return micro, t.batch_size // (micro * world_size)


def _prepare_run_dir(
    cfg: RunConfig, resume: str | bool | None, overwrite: bool, where: str
) -> tuple[Path, Path | None]:
    """The run folder, and the checkpoint to resume from (None: a fresh start)."""
    run_dir = Path(cfg.train.out_dir) / cfg.name
    checkpoints = run_dir / "checkpoints"
    if resume:
        source = runs.resolve_checkpoint(checkpoints if resume is True else resume)
        return run_dir, source
    if runs.list_checkpoints(checkpoints) and not overwrite:
        raise ConfigError(f"{where}: {run_dir} already holds checkpoints (latest "
                          f"{runs.latest_checkpoint(checkpoints).name}); pass --resume to continue that run, "
                          "--overwrite to start it again, or --name=... for a new run")
    return run_dir, None


def _model_diff(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _apply_activation_checkpointing(model: MoTTransformer) -> None:
    # The composable API keeps parameter names, so checkpoints load with or without it.
    from torch.distributed._composable import checkpoint

    for block in model.blocks:
        checkpoint(block)


class _Window:
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


def per_modality(names: list[str], loss_sum: torch.Tensor, count: torch.Tensor, prefix: str = "loss/") -> dict:
    return {f"{prefix}{n}": (loss_sum[i] / count[i]).item() for i, n in enumerate(names) if count[i] > 0}


class Trainer:
    def __init__(self, cfg: RunConfig, where: str = "recipe", resume: str | bool | None = None,
                 overwrite: bool = False, progress: bool = True, init_from: str | None = None):
        self.cfg, self.where, self.progress = cfg, where, progress
        self.accelerator = acc = _accelerator(cfg)
        self.micro, self.accum = _batch_shape(cfg, acc.num_processes, where)
        self.run_dir, self.resume_from = _prepare_run_dir(cfg, resume, overwrite, where)
        with acc.main_process_first():  # one process prepares the shards, the others then find them
            shards = ensure_prepared(cfg, where)
        if acc.is_main_process:
            if overwrite and self.resume_from is None and self.run_dir.exists():
                shutil.rmtree(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
            self._copy_tokenizers()
        acc.wait_for_everyone()

        torch.manual_seed(cfg.train.seed)
        model = MoTTransformer(cfg.model)
        if init_from is not None and self.resume_from is None:
            from mot.grow import load_weights_into  # a ConfigError names any architecture mismatch

            meta = load_weights_into(model, init_from, where)
            if acc.is_main_process:  # an imported model's vocabulary mapping goes with its weights (export-hf)
                carry_interop_files(runs.resolve_checkpoint(init_from).parent.parent, self.run_dir)
                print(f"mot: weights from {init_from} ({meta.get('operation', 'trained')}); "
                      "fresh optimizer, schedule and data order")
        # Before any wrapping renames the parameters; a bad entry fails here, before the loaders start.
        self.freezer = Freezer(cfg.model, model, cfg.train.freeze) if cfg.train.freeze else None
        self.vocab, self.names = model.vocab, [m.name for m in cfg.model.modalities]
        self.loss_weights = torch.tensor([m.loss_weight for m in cfg.model.modalities], device=acc.device)
        # Diffusion modalities (Transfusion setting): image spans become noised latent tokens.
        self.diffusion = {i: m for i, m in enumerate(cfg.model.modalities) if m.is_diffusion}
        self.is_diffusion = torch.tensor([m.is_diffusion for m in cfg.model.modalities], device=acc.device)
        self.batcher = (LatentBatcher(model.vocab, cfg.model.modalities, load_codecs(cfg.model, cfg.data.tokenizers,
                                                                                      where))
                        if self.diffusion else None)
        if cfg.train.activation_checkpointing:
            _apply_activation_checkpointing(model)
        self.loss_fn = next_token_loss
        if cfg.train.compile:
            for block in model.blocks:  # one compiled block serves every layer
                block.compile()
            # Fused: reads the bf16 logits once, never keeps an fp32 copy of them for backward.
            self.loss_fn = torch.compile(next_token_loss)
        model.to(acc.device)  # first, so that AdamW picks its fused kernel for the device
        self.sharded = cfg.train.distributed == "fsdp" and acc.num_processes > 1
        self.master_weights = _master_weights(cfg, acc, where)
        # fused, also over FSDP's DTensors; with master weights the matmul weights become bf16 here
        if self.freezer is not None and self.sharded:
            raise ConfigError(f"{where}: train.freeze is not supported with train.distributed = 'fsdp' yet "
                              "(frozen rows of sharded gradients); use 'ddp'")
        optimizer = build_optimizer(model, cfg.train, master_weights=self.master_weights, freezer=self.freezer)
        if self.master_weights and self.accum > 1:  # the blocks' GEMMs add into the fp32 gradient sums themselves
            optimizer.accumulate_in_backward(model)
        self.scheduler = build_scheduler(optimizer, cfg.train)
        self.model, self.optimizer = acc.prepare(model, optimizer)

        self.train_loader, self.eval_loader = build_loaders(cfg, shards, self.vocab, self.micro,
                                                            acc.process_index, acc.num_processes)
        self.eval_start = self.eval_loader.state_dict() if self.eval_loader is not None else None
        self.train_batches = RankSlice(self.train_loader, acc.process_index, acc.num_processes)

        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        # FLOPs as computed: projections per token, attention under each batch's document mask (train_step);
        # the full-row causal count, what a model without document masks would do, is logged beside it.
        self.projection_flops = projection_flops_per_token(cfg.model)
        self.full_causal_flops_per_token = size_report(cfg.model, cfg.train.seq_len).flops_forward_backward_mixed
        self.step_flops = 0.0
        self.peak = peak_flops(acc.device, cfg.train.peak_tflops)
        self.step, self.tokens_seen, self.wall_s, self.skipped, self.skipped_in_row = 0, 0, 0.0, 0, 0
        self.flops_seen = 0.0  # summed step by step: after `mot grow`, earlier tokens keep their old cost
        if self.resume_from is not None:
            self._load(self.resume_from)

    # ------------------------------------------------------------ setup helpers

    def _copy_tokenizers(self) -> None:
        source = self.cfg.data.tokenizers
        target = self.run_dir / "tokenizers"
        if source and Path(source).is_dir() and not target.exists():
            shutil.copytree(source, target)

    def _load(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        optimizer_state, rng, meta = ckpt.load_training_state(path)
        if meta.get("weights_only"):
            raise ConfigError(f"{self.where}: {path} holds weights only (mot {meta.get('operation')}); "
                              f"start a run from it with --init-from {path}")
        saved_model = meta["config"]["model"]
        diff = _model_diff(saved_model, config_to_dict(self.cfg)["model"])
        if diff:
            raise ConfigError(f"{self.where}: cannot resume from {path}: the model differs from the checkpoint's "
                              f"({'; '.join(diff)})")
        saved_freeze = meta["config"].get("train", {}).get("freeze", [])
        if saved_freeze != self.cfg.train.freeze:  # the optimizer's groups and zero moments depend on it
            raise ConfigError(f"{self.where}: cannot resume from {path} with train.freeze = {self.cfg.train.freeze}: "
                              f"it was trained with {saved_freeze}; start a new run with --init-from {path}")
        options = StateDictOptions(full_state_dict=True)
        model_state = runs.load_model_state(path)
        set_model_state_dict(self.model, model_state, options=options)
        if self.master_weights:  # the fp32 weights as saved, not the bf16 copies the model now holds
            self.optimizer.optimizer.load_masters(model_state)
        set_optimizer_state_dict(self.model, self.optimizer, optimizer_state, options=options)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.train_loader.load_state_dict(meta["loader"])
        ckpt.restore_rng(rng, meta.get("python_rng"))
        self.step, self.tokens_seen, self.wall_s = meta["step"], meta["tokens_seen"], meta["wall_s"]
        self.flops_seen = meta.get("flops_seen", self.tokens_seen * self.full_causal_flops_per_token)
        self.skipped = meta.get("skipped_steps", 0)
        if self.accelerator.is_main_process:
            print(f"mot: resumed from {path} at step {self.step}")

    # ------------------------------------------------------------ one step

    def _host_batch(self, batch: PackedBatch) -> PackedBatch | LatentBatch:
        """A loader batch with diffusion modalities' image spans turned into latents, its towers counted."""
        if self.batcher is not None:
            batch = self.batcher(batch)
        if batch.modality.device.type == "cpu":  # counted here, the blocks never read them back from the GPU
            batch = batch.counted(len(self.names))
        return batch

    def _batch(self, batch: PackedBatch) -> PackedBatch | LatentBatch:
        """A loader batch on the device (see `_host_batch`)."""
        return self._host_batch(batch).to(self.accelerator.device, non_blocking=True)

    def _loss(self, batch: PackedBatch | LatentBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-modality loss sums and prediction counts of one micro-batch (for a diffusion modality: the
        squared error summed over its latent tokens, and their count)."""
        if not isinstance(batch, LatentBatch):
            logits = self.model(batch.tokens, batch.modality, batch.positions, self._mask(batch),
                                tower_counts=batch.tower_counts)
            _, loss_sum, count = self.loss_fn(logits, batch.tokens, batch.modality, len(self.names))
            return loss_sum, count
        noised, times, clean, noise = {}, {}, {}, {}
        for m, x0 in batch.latents.items():  # (images, tokens, token_dim): each image at its own time
            t = torch.rand(x0.shape[0], device=x0.device)
            noise[m] = torch.randn_like(x0)
            noised[m] = add_noise(x0, t, noise[m], self.diffusion[m].schedule).flatten(0, 1)
            times[m] = t.repeat_interleave(x0.shape[1])
            clean[m], noise[m] = x0.flatten(0, 1), noise[m].flatten(0, 1)
        logits, predictions = self.model(batch.tokens, batch.modality, batch.positions, self._mask(batch),
                                         noised, times, batch.tower_counts)
        _, loss_sum, count = self.loss_fn(logits, batch.tokens, batch.modality, len(self.names), batch.target_mask)
        extra_sum, extra_count = torch.zeros_like(loss_sum), torch.zeros_like(count)
        for m, prediction in predictions.items():
            s, c = diffusion_loss(prediction, clean[m], noise[m], self.diffusion[m].schedule)
            extra_sum[m], extra_count[m] = s, c
        return loss_sum + extra_sum, count + extra_count

    def _mask(self, batch: PackedBatch | LatentBatch):
        t = self.cfg.train
        if batch.document_ids.is_cuda and (t.flex_attention is True or (t.flex_attention == "auto" and t.compile)):
            if isinstance(batch, LatentBatch):
                return mixed_block_mask(batch.document_ids, batch.span_ids)
            return document_block_mask(batch.document_ids)
        return batch.attn_mask()

    def objective(self, loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """The weighted loss of the diffusion setting (Transfusion): the token mean of the next-token losses
        plus, per diffusion modality, its loss weight times its mean squared error."""
        weights, diffusion = self.loss_weights, self.is_diffusion
        if loss_sum.device != weights.device:  # host totals
            weights, diffusion = weights.cpu(), diffusion.cpu()
        ar = torch.where(diffusion, 0.0, loss_sum * weights).sum() / torch.where(diffusion, 0.0, count).sum().clamp(
            min=1)
        return ar + torch.where(diffusion, loss_sum * weights / count.clamp(min=1), 0.0).sum()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """One optimizer step (forward/backward of `accum` micro-batches). Returns the per-modality loss sums
        and counts over all processes, the weighted loss and the gradient norm (before clipping)."""
        acc, n = self.accelerator, len(self.names)
        predictions = self.accum * self.micro * (self.cfg.train.seq_len - 1)
        loss_sum = torch.zeros(n, device=acc.device)
        count = torch.zeros(n, device=acc.device)
        pairs = 0
        for micro in range(self.accum):
            batch = self._host_batch(next(self.train_batches))
            pairs += attention_pairs(batch.document_ids, getattr(batch, "span_ids", None))  # on the host: no sync
            batch = batch.to(acc.device, non_blocking=True)
            # Gradients are all-reduced once, on the last micro-batch.
            sync = nullcontext() if micro == self.accum - 1 else acc.no_sync(self.model)
            if self.sharded and self.cfg.train.fsdp_keep_gathered:
                keep_gathered(self.model, micro, self.accum)
            with sync:
                micro_sum, micro_count = self._loss(batch)
                if self.batcher is None:
                    acc.backward((micro_sum * self.loss_weights).sum() / predictions)
                else:  # per-objective means of this micro-batch (their counts vary), averaged over the step
                    acc.backward(self.objective(micro_sum, micro_count) / self.accum)
            if self.master_weights and micro < self.accum - 1:
                self.optimizer.optimizer.stash_gradients()  # fp32 sums of the other bf16 gradients
            loss_sum += micro_sum.detach()
            count += micro_count
        if self.freezer is not None:  # before the norm: it is the trainable part's
            self.freezer.mask_gradients(self.optimizer.optimizer)
        clip = self.cfg.train.grad_clip or math.inf
        if self.sharded:  # DTensor gradients: accelerate's DTensor-aware clip
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), clip)
        else:  # folded into the fused AdamW step (the same on every process)
            grad_norm = clip_gradients(self.optimizer.optimizer, self.model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        totals = acc.reduce(torch.cat([loss_sum, count]), reduction="sum")
        totals = torch.cat([totals, grad_norm.detach().reshape(1).float()]).cpu()  # the step's one host sync
        loss_sum, count, grad_norm = totals[:n], totals[n : 2 * n], float(totals[-1])
        weighted = self._weighted(loss_sum, count)
        if acc.num_processes > 1:  # every process's rows of the global batch
            pairs = int(acc.reduce(torch.tensor([pairs], dtype=torch.int64, device=acc.device), reduction="sum"))
        self.step_flops = self.tokens_per_step * self.projection_flops + 3 * attention_flops(self.cfg.model, pairs)
        return loss_sum, count, weighted, grad_norm

    def _weighted(self, loss_sum: torch.Tensor, count: torch.Tensor) -> float:
        """The weighted loss of summed (host) totals, as reported."""
        if self.batcher is not None:
            return float(self.objective(loss_sum.float(), count.float()))
        return float((loss_sum * self.loss_weights.cpu()).sum() / count.sum().clamp(min=1))

    def _non_finite(self, loss_sum: torch.Tensor, count: torch.Tensor, grad_norm: float) -> str | None:
        bad = [n for i, n in enumerate(self.names) if not math.isfinite(float(loss_sum[i]))]
        if bad:
            losses = per_modality(self.names, loss_sum, count, prefix="")
            shown = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
            return f"step {self.step + 1}: non-finite loss for modality {', '.join(bad)} ({shown})"
        if not math.isfinite(grad_norm):
            return f"step {self.step + 1}: non-finite gradient norm ({grad_norm}) with finite losses"
        return None

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_loader is None:
            return {}
        acc, n = self.accelerator, len(self.names)
        self.eval_loader.load_state_dict(self.eval_start)  # the same held-out batches every time
        batches = RankSlice(self.eval_loader, acc.process_index, acc.num_processes)
        loss_sum = torch.zeros(n, device=acc.device)
        count = torch.zeros(n, device=acc.device)
        self.model.eval()
        for _ in range(self.cfg.train.eval_batches * self.accum):  # the same sequences on any device count
            s, c = self._loss(self._batch(next(batches)))
            loss_sum += s
            count += c
        self.model.train()
        totals = acc.reduce(torch.cat([loss_sum, count]), reduction="sum").cpu().double()
        loss_sum, count = totals[:n], totals[n:]
        out = {"loss": self._weighted(loss_sum, count)}
        out.update(per_modality(self.names, loss_sum, count))
        ar_names = {n for i, n in enumerate(self.names) if i not in self.diffusion}  # a squared error has no ppl
        out.update({f"ppl/{k[5:]}": math.exp(min(v, 50.0)) for k, v in list(out.items())
                    if k.startswith("loss/") and k[5:] in ar_names})
        out.update({f"tokens/{self.names[i]}": int(count[i]) for i in range(n)})
        return out

    # ------------------------------------------------------------ checkpoints

    def save(self) -> Path | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        acc = self.accelerator
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=options)  # collective under FSDP
        if self.master_weights:  # the checkpoint's weights are the fp32 masters, not the bf16 compute copies
            model_state.update({k: v.detach().cpu() for k, v in self.optimizer.optimizer.master_state_dict().items()})
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        path = None
        if acc.is_main_process:
            meta = {
                "tokens_seen": self.tokens_seen, "wall_s": self.wall_s, "skipped_steps": self.skipped,
                "flops_seen": self.flops_seen,
                "scheduler": self.scheduler.state_dict(), "loader": self.train_loader.state_dict(),
                "python_rng": ckpt.python_rng_state(), "config": config_to_dict(self.cfg),
                "tokenizers": str(Path(self.cfg.data.tokenizers).resolve()) if self.cfg.data.tokenizers else "",
            }
            path = ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, model_state, optimizer_state,
                                        meta, keep=self.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------ the loop

    def fit(self, until: int | None = None) -> TrainResult:
        """Train up to step `until` (default train.steps; the schedule always spans train.steps)."""
        t, acc = self.cfg.train, self.accelerator
        until = t.steps if until is None else min(until, t.steps)
        main = acc.is_main_process
        log = MetricsLog(self.run_dir, t.tensorboard, resume_step=self.step) if main else None
        window = _Window(len(self.names))
        result = TrainResult(self.run_dir, self.step, {})
        bar = tqdm(total=t.steps, initial=self.step, desc=self.cfg.name, unit="step", dynamic_ncols=True,
                   disable=not (main and self.progress))
        self.model.train()
        try:
            while self.step < until:
                start = time.perf_counter()
                update = self.update(log)
                seconds = time.perf_counter() - start
                self.wall_s += seconds
                result.losses.append(update.weighted)
                if update.applied:
                    window.add(update.loss_sum, update.count, update.weighted, self.tokens_per_step, seconds,
                               self.step_flops)
                bar.update(1)

                if main and window.steps and (self.step % max(t.log_every, 1) == 0 or self.step == until):
                    row = self._train_row(window, update.lr, update.grad_norm)
                    log.write("train", self.step, row)
                    result.train_loss = {k: v for k, v in row.items() if k.startswith("loss")}
                    bar.set_postfix(self._postfix(row), refresh=False)
                    window = _Window(len(self.names))
                final = self.step == until
                if final or (t.eval_every and self.step % t.eval_every == 0):
                    evaluation = self.evaluate()
                    if main and evaluation:
                        log.write("eval", self.step, {**evaluation, **self._counters()})
                        result.eval_loss = {k: v for k, v in evaluation.items() if k.startswith("loss")}
                        plot_loss_curves(log.path, self.run_dir / "loss_curves.png", self.cfg.name)
                if final or (t.checkpoint_every and self.step % t.checkpoint_every == 0):
                    result.checkpoint = self.save()
        finally:
            bar.close()
            if log is not None:
                log.close()
        if main:
            result.plot = plot_loss_curves(self.run_dir / "log.jsonl", self.run_dir / "loss_curves.png",
                                           self.cfg.name)
            summary = {"step": self.step, "train": result.train_loss, "eval": result.eval_loss,
                       "skipped_steps": self.skipped, **self._counters(),
                       "checkpoint": str(result.checkpoint), "plot": str(result.plot)}
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        result.step, result.skipped_steps = self.step, self.skipped
        return result

    def update(self, log: MetricsLog | None = None) -> Update:
        """One optimizer step as `fit` takes it (bench/step.py times this): `train_step`, then the update unless
        the losses or the gradient norm are not finite (train.on_nonfinite), the schedule, the counters."""
        loss_sum, count, weighted, grad_norm = self.train_step()
        problem = self._non_finite(loss_sum, count, grad_norm)
        if problem is None:
            if self.freezer is not None:
                self.freezer.decay(self.optimizer.optimizer)
            self.optimizer.step()
            self.skipped_in_row = 0
        else:
            self._handle_non_finite(problem, log)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.flops_seen += self.step_flops
        return Update(loss_sum, count, weighted, grad_norm, lr, applied=problem is None)

    def _handle_non_finite(self, problem: str, log: MetricsLog | None) -> None:
        t = self.cfg.train
        last = runs.latest_checkpoint(self.run_dir / "checkpoints")
        if log is not None:
            log.write("error", self.step + 1, {"message": problem})
        self.skipped += 1
        self.skipped_in_row += 1
        if t.on_nonfinite == "stop" or self.skipped_in_row > t.max_skipped_steps:
            why = "" if t.on_nonfinite == "stop" else f" ({self.skipped_in_row} updates in a row skipped)"
            raise NonFiniteError(f"{problem}{why}. Training stopped; the last checkpoint "
                                 f"({last or 'none yet'}) is untouched. Set train.on_nonfinite='skip' to drop "
                                 "such updates instead.")
        tqdm.write(f"mot: {problem}: update skipped")

    def _counters(self) -> dict[str, float]:
        return {"tokens": self.tokens_seen, "flops": self.flops_seen,
                "wall_s": round(self.wall_s, 3)}

    def _train_row(self, window: _Window, lr: float, grad_norm: float) -> dict[str, Any]:
        tokens_per_s = window.tokens / window.seconds
        row: dict[str, Any] = {"loss": window.weighted / window.steps}
        row.update(per_modality(self.names, window.loss_sum, window.count))
        row.update({"lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                    "step_ms": 1e3 * window.seconds / window.steps, **self._counters()})
        if self.peak:  # per device: the step's FLOPs over every process
            devices = self.peak * self.accelerator.num_processes
            row["mfu"] = window.flops / window.seconds / devices
            row["mfu_full_causal"] = tokens_per_s * self.full_causal_flops_per_token / devices
        return row

    def _postfix(self, row: dict[str, Any]) -> dict[str, str]:
        out = {k.split("/", 1)[1]: f"{v:.3f}" for k, v in row.items() if k.startswith("loss/")}
        out["tok/s"] = f"{row['tokens_per_s']:.0f}"
        if "mfu" in row:
            out["mfu"] = f"{100 * row['mfu']:.1f}%"
        return out


def train(cfg: RunConfig, where: str = "recipe", resume: str | bool | None = None, overwrite: bool = False,
          progress: bool = True, init_from: str | None = None) -> TrainResult:
    return Trainer(cfg, where, resume, overwrite, progress, init_from).fit()
