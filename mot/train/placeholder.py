"""Stand-in for the trainer until it exists (issue: trainer).

Validates the recipe, prints the FLOPs table of MoT against dense, then runs
both models on one synthetic batch in the recipe's modality mix: a
forward+backward under FlopCounterMode (measured against `mot/flops.py`) and a
few optimizer steps that must drive the loss down.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from mot.config import RunConfig
from mot.data.synthetic import random_layout, tokens_for_layout
from mot.flops import dense_baseline, flop_counter, size_report
from mot.model import MoTTransformer
from mot.objectives.ar import next_token_loss

SMOKE_STEPS = 20


def _smoke(model: MoTTransformer, tokens: torch.Tensor, label: str) -> dict[str, float]:
    modality = model.vocab.modality_of(tokens)
    n = model.cfg.n_modalities
    # The math backend runs attention as bmm, which FlopCounterMode can see on the CPU.
    with flop_counter() as counter, sdpa_kernel(SDPBackend.MATH):
        loss, _, _ = next_token_loss(model(tokens), tokens, modality, n)
        loss.backward()
    measured = counter.get_total_flops()
    model.zero_grad(set_to_none=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = loss.item()
    start = time.perf_counter()
    for _ in tqdm(range(SMOKE_STEPS), desc=f"{label}: {SMOKE_STEPS} steps on one batch", leave=False):
        loss, _, _ = next_token_loss(model(tokens), tokens, modality, n)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    return {"measured": measured, "first": first, "last": loss.item(), "ms": 1e3 * elapsed / SMOKE_STEPS}


def run_placeholder(cfg: RunConfig, recipe: Path) -> int:
    from mot.cli import flops_table, wide_console

    console = wide_console()
    console.print(f"[bold]mot[/bold]: recipe {recipe} is valid. The trainer is not built yet; "
                  "this run prints the FLOPs table and checks both models on a synthetic batch.")
    console.print(flops_table(cfg, cfg.train.seq_len))

    torch.manual_seed(cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    seq_len, batch = cfg.train.seq_len, min(cfg.train.batch_size, 4)
    layout = random_layout(batch, seq_len, list(range(cfg.model.n_modalities)), 64, gen)
    table = Table(title=f"one synthetic batch of {batch} x {seq_len} tokens (CPU, fp32)")
    for col in ("model", "params", "fwd+bwd FLOPs, counted", "flops.py", "ratio",
                f"loss 0 -> {SMOKE_STEPS}", "ms/step"):
        table.add_column(col, justify="right")
    for label, model_cfg in (("MoT", cfg.model), ("dense", dense_baseline(cfg.model))):
        model = MoTTransformer(model_cfg)
        tokens = tokens_for_layout(layout, model.vocab, gen)
        result = _smoke(model, tokens, label)
        predicted = size_report(model_cfg, seq_len, attention="full").flops_forward_backward_mixed
        predicted *= batch * seq_len
        params = sum(p.numel() for p in model.parameters())
        table.add_row(label, f"{params / 1e6:.2f}M", f"{result['measured'] / 1e9:.2f} G",
                      f"{predicted / 1e9:.2f} G", f"{result['measured'] / predicted:.3f}",
                      f"{result['first']:.2f} -> {result['last']:.2f}", f"{result['ms']:.0f}")
    console.print(table)
    return 0
