"""A run's training state, built from its config: the model, optimizer, schedule, objective and loaders, with the
counters that a checkpoint carries (`state_dict` / `load_state_dict`: step, tokens, FLOPs, wall time, schedule,
loader position; the weights and optimizer state are saved by mot/train/checkpoint.py).

    state = build_state(load_config("recipes/demo.toml"), where="recipes/demo.toml")

Devices and precision come from accelerate: bf16 autocast on a GPU (with fp32 master weights in the optimizer
on one GPU, `train.master_weights`), DDP or FSDP2 over several processes. One optimizer step is `accum`
micro-batches of `micro` sequences per process.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mot import runs
from mot.config import ConfigError, RunConfig, config_to_dict
from mot.data.loader import PackedLoader
from mot.flops import projection_flops_per_token, size_report
from mot.interop.run_files import carry_interop_files
from mot.model import MoTTransformer
from mot.model.block import MoTBlock
from mot.objectives.ar import next_token_loss
from mot.objectives.training import NextToken, build_objective
from mot.train.data import Prefetched, RankSlice, build_loaders, ensure_prepared
from mot.train.freeze import Freezer
from mot.train.graphed_step import MicroBatchGraph
from mot.train.optim import build_optimizer, build_scheduler
from mot.vocab import UnifiedVocab

# Dense bf16 tensor-core peak per device (no sparsity), for MFU.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: torch.device, configured_tflops: float) -> float | None:
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


@dataclass
class TrainState:
    cfg: RunConfig
    where: str  # names the recipe in errors
    run_dir: Path
    accelerator: Any
    model: Any  # MoTTransformer as accelerate prepared it (DDP / FSDP wrapped on several processes)
    optimizer: Any  # accelerate's wrapper; `inner_optimizer` is the optimizer itself
    scheduler: Any
    objective: NextToken
    freezer: Freezer | None
    train_loader: PackedLoader
    train_batches: RankSlice | Prefetched  # this process's rows of each global micro-batch
    eval_loader: PackedLoader | None
    eval_start: dict | None  # the eval loader's position at its start: every evaluation reads the same batches
    vocab: UnifiedVocab
    micro: int  # sequences per process per forward pass
    accum: int  # micro-batches per optimizer step
    master_weights: bool
    sharded: bool  # FSDP over several processes
    flex: bool  # FlexAttention block masks for CUDA batches
    peak: float | None  # the device's dense bf16 peak FLOP/s, for MFU
    projection_flops: float  # fwd+bwd FLOPs per token outside attention
    full_causal_flops_per_token: float  # with attention over the whole row, logged beside the masked count
    # counters, saved in checkpoints
    step: int = 0
    tokens_seen: int = 0
    flops_seen: float = 0.0  # summed step by step: after `mot grow`, earlier tokens keep their old cost
    wall_s: float = 0.0
    skipped: int = 0
    skipped_in_row: int = 0
    step_flops: float = 0.0  # FLOPs of the last step (attention under its micro-batches' document masks)
    graph: MicroBatchGraph | None = None  # under train.cuda_graph (mot/train/graphed_step.py)
    names: list[str] = field(default_factory=list)

    @property
    def inner_optimizer(self):
        """The optimizer accelerate wraps (MasterWeightAdamW under master weights, else torch's AdamW)."""
        return self.optimizer.optimizer

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.seq_len

    def state_dict(self) -> dict[str, Any]:
        """The counters, the schedule and the loader's position (the weights and optimizer are saved apart)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "wall_s": self.wall_s,
                "skipped_steps": self.skipped, "flops_seen": self.flops_seen,
                "scheduler": self.scheduler.state_dict(), "loader": self.train_batches.state_dict()}

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(meta["scheduler"])
        self.train_batches.load_state_dict(meta["loader"])
        self.step, self.tokens_seen, self.wall_s = meta["step"], meta["tokens_seen"], meta["wall_s"]
        self.flops_seen = meta.get("flops_seen", self.tokens_seen * self.full_causal_flops_per_token)
        self.skipped = meta.get("skipped_steps", 0)


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


def _apply_activation_checkpointing(model: MoTTransformer) -> None:
    # The composable API keeps parameter names, so checkpoints load with or without it.
    from torch.distributed._composable import checkpoint

    for block in model.blocks:
        checkpoint(block)


def _write_run_files(cfg: RunConfig, run_dir: Path, fresh: bool) -> None:
    """config.json and a copy of the tokenizers (for generation) in the run folder; an overwritten run's old
    files go first."""
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    source, target = cfg.data.tokenizers, run_dir / "tokenizers"
    if source and Path(source).is_dir() and not target.exists():
        shutil.copytree(source, target)



def check_held_out_size(cfg: RunConfig, eval_loader, where: str) -> None:
    """Before any step: the final evaluation must fit in the held-out set (else its batches would repeat and
    its standard errors be void, found out only at the end of the run)."""
    t = cfg.train
    if not t.final_eval_batches or eval_loader is None:
        return
    held = eval_loader.tokens_per_epoch // (t.batch_size * t.seq_len)
    if t.final_eval_batches > held:
        raise ConfigError(f"{where}: train.final_eval_batches ({t.final_eval_batches}) asks for more global batches "
                          f"than the held-out set holds ({held} of train.batch_size x train.seq_len tokens, "
                          f"data.eval_fraction = {cfg.data.eval_fraction}); raise data.eval_fraction or lower "
                          "train.final_eval_batches")


def build_state(cfg: RunConfig, where: str = "recipe", resume: str | bool | None = None, overwrite: bool = False,
                init_from: str | None = None) -> tuple[TrainState, Path | None]:
    """The run's state before its first step, and the checkpoint to resume from (loaded by the caller through
    mot/train/checkpoint.py; None for a fresh start)."""
    acc = _accelerator(cfg)
    micro, accum = _batch_shape(cfg, acc.num_processes, where)
    run_dir, resume_from = _prepare_run_dir(cfg, resume, overwrite, where)
    with acc.main_process_first():  # one process prepares the shards, the others then find them
        shards = ensure_prepared(cfg, where)
    if acc.is_main_process:
        _write_run_files(cfg, run_dir, fresh=overwrite and resume_from is None)
    acc.wait_for_everyone()

    torch.manual_seed(cfg.train.seed)
    model = MoTTransformer(cfg.model)
    if init_from is not None and resume_from is None:
        from mot.grow import load_weights_into  # a ConfigError names any architecture mismatch

        meta = load_weights_into(model, init_from, where)
        if acc.is_main_process:  # an imported model's vocabulary mapping goes with its weights (export-hf)
            carry_interop_files(runs.resolve_checkpoint(init_from).parent.parent, run_dir)
            print(f"mot: weights from {init_from} ({meta.get('operation', 'trained')}); "
                  "fresh optimizer, schedule and data order")
    # Before any wrapping renames the parameters; a bad entry fails here, before the loaders start.
    freezer = Freezer(cfg.model, model, cfg.train.freeze) if cfg.train.freeze else None
    if cfg.train.activation_checkpointing:
        _apply_activation_checkpointing(model)
    loss_fn = next_token_loss
    if cfg.train.compile:
        for block in model.blocks:  # one compiled block serves every layer
            block.compile()
        # Fused: reads the bf16 logits once, never keeps an fp32 copy of them for backward.
        loss_fn = torch.compile(next_token_loss)
    # Diffusion modalities (Transfusion setting): image spans become noised latent tokens.
    objective = build_objective(cfg.model, cfg.data.tokenizers, model.vocab, where, loss_fn).to(acc.device)
    model.to(acc.device)  # first, so that AdamW picks its fused kernel for the device
    sharded = cfg.train.distributed == "fsdp" and acc.num_processes > 1
    master_weights = _master_weights(cfg, acc, where)
    if cfg.train.cuda_graph and (acc.device.type != "cuda" or acc.num_processes > 1):
        raise ConfigError(f"{where}: train.cuda_graph runs on one CUDA device (here {acc.num_processes} process(es) "
                          f"on {acc.device.type}); set it to false")
    if freezer is not None and sharded:
        raise ConfigError(f"{where}: train.freeze is not supported with train.distributed = 'fsdp' yet "
                          "(frozen rows of sharded gradients); use 'ddp'")
    # fused, also over FSDP's DTensors; with master weights the matmul weights become bf16 here
    optimizer = build_optimizer(model, cfg.train, master_weights=master_weights, freezer=freezer)
    if master_weights and accum > 1:  # the blocks' GEMMs add into the fp32 gradient sums themselves
        optimizer.accumulate_in_backward(model)
    scheduler = build_scheduler(optimizer, cfg.train)
    vocab = model.vocab
    model, optimizer = acc.prepare(model, optimizer)

    train_loader, eval_loader = build_loaders(cfg, shards, vocab, micro, acc.process_index, acc.num_processes)
    check_held_out_size(cfg, eval_loader, where)
    train_batches = RankSlice(train_loader, acc.process_index, acc.num_processes)
    if cfg.train.cuda_graph:  # the host idles during a replay: pack the next batches then
        train_batches = Prefetched(train_batches)
    t = cfg.train
    state = TrainState(
        cfg=cfg, where=where, run_dir=run_dir, accelerator=acc, model=model, optimizer=optimizer,
        scheduler=scheduler, objective=objective, freezer=freezer, train_loader=train_loader,
        train_batches=train_batches, eval_loader=eval_loader,
        eval_start=eval_loader.state_dict() if eval_loader is not None else None, vocab=vocab, micro=micro,
        accum=accum, master_weights=master_weights, sharded=sharded,
        flex=t.flex_attention is True or (t.flex_attention == "auto" and t.compile),
        peak=peak_flops(acc.device, t.peak_tflops), projection_flops=projection_flops_per_token(cfg.model),
        full_causal_flops_per_token=size_report(cfg.model, t.seq_len).flops_forward_backward_mixed,
        names=[m.name for m in cfg.model.modalities],
    )
    if t.cuda_graph:  # captured at the first micro-batch
        state.graph = MicroBatchGraph(state)
    return state, resume_from
