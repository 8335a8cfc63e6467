"""The `mot` command: one sub-command per task.

    mot flops RECIPE.toml [RECIPE ...] [--seq-len N] [--key=value ...]
    mot train [RECIPE.toml] [--resume[=CKPT]] [--overwrite] [--key=value ...]   (same as python train_mot.py)
    mot compare RUN_DIR RUN_DIR [...] [--out DIR] | mot compare --recipe R.toml [--key=value ...]
    mot demo-data | tokenizer train|encode|decode | prepare   (see mot/data_commands.py)
    mot grow | upcycle | add-modality CKPT ... --out DIR     (see mot/grow_cli.py)
    mot import-hf CHAMELEON_FOLDER --out RUN | export-hf RUN --out FOLDER   (see mot/interop/cli.py)
    mot serve --ckpt RUN [--port 8000]                        (see mot/serve/cli.py)
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mot.compare import CompareError
from mot.config import ConfigError, RunConfig, load_config
from mot.data.prepare import PrepareError
from mot.data_commands import add_commands as add_data_commands
from mot.flops import SizeReport, dense_baseline, size_report
from mot.generate.cli import add_commands as add_generate_commands
from mot.grow_cli import add_commands as add_grow_commands
from mot.interop.cli import add_commands as add_interop_commands
from mot.runs import CheckpointError
from mot.serve.cli import add_commands as add_serve_commands
from mot.tokenize.base import TokenizerError
from mot.train.errors import NonFiniteError, TrainingStopped

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.toml"


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def flops_table(cfg: RunConfig, seq_len: int) -> Table:
    """MoT against the dense baseline of the same width, one row per figure."""
    mot = size_report(cfg.model, seq_len)
    dense = size_report(dense_baseline(cfg.model), seq_len)
    m = cfg.model
    ffn = (f"pattention tokens={m.param_tokens_of('attn')}/{m.param_tokens_of('ffn')}" if m.projection == "pattention"
           else f"ffn={m.ffn_hidden}")
    title = f"{cfg.name}: d={m.dim} L={m.n_layers} H={m.n_heads} {ffn} untie={m.untie} seq_len={seq_len}"

    table = Table(title=title)
    for col in ("", "MoT", "dense", "MoT / dense"):
        table.add_column(col, justify="right" if col else "left")

    def row(label: str, a: float, b: float, unit: str = "") -> None:
        table.add_row(label, _human(a, unit), _human(b, unit), f"{a / b:.3f}" if b else "-")

    row("total params", mot.total_params, dense.total_params)
    row("embedding + head params", mot.embedding_params, dense.embedding_params)
    row("non-embedding params", mot.total_params - mot.embedding_params,
        dense.total_params - dense.embedding_params)
    if mot.latent_params:  # diffusion modalities: latent in/out projections and timestep MLP (shared by both)
        row("  of which latent projections", mot.latent_params, dense.latent_params)
    for mod in m.modalities:
        row(f"active params / {mod.name} token", mot.active_params[mod.name], dense.active_params[mod.name])
    row("active params / token (mixed)", mot.active_params_mixed, dense.active_params_mixed)
    row("FLOPs / token forward", _first(mot.flops_forward), _first(dense.flops_forward), "FLOP")
    row("  of which attention (causal)", mot.attention_flops_forward, dense.attention_flops_forward, "FLOP")
    row("FLOPs / token fwd+bwd (mixed)", mot.flops_forward_backward_mixed,
        dense.flops_forward_backward_mixed, "FLOP")
    tokens = seq_len * cfg.train.batch_size
    row(f"FLOPs / step fwd+bwd ({tokens} tokens)", mot.flops_forward_backward_mixed * tokens,
        dense.flops_forward_backward_mixed * tokens, "FLOP")
    return table


def _first(per_modality: dict[str, float]) -> float:
    return next(iter(per_modality.values()))


def summary_table(rows: list[tuple[str, RunConfig, SizeReport, SizeReport]]) -> Table:
    table = Table(title="MoT vs dense across recipes (FLOPs per token, causal attention)")
    cols = ("recipe", "d", "L", "H", "seq", "dense params", "MoT params", "MoT/dense params",
            "active/token", "fwd+bwd FLOPs/token", "MoT/dense FLOPs")
    for col in cols:
        table.add_column(col, justify="left" if col == "recipe" else "right")
    for name, cfg, mot, dense in sorted(rows, key=lambda r: r[3].total_params):
        m = cfg.model
        table.add_row(
            name, str(m.dim), str(m.n_layers), str(m.n_heads), str(mot.seq_len),
            _human(dense.total_params), _human(mot.total_params),
            f"{mot.total_params / dense.total_params:.2f}", _human(mot.active_params_mixed),
            _human(mot.flops_forward_backward_mixed),
            f"{mot.flops_forward_backward_mixed / dense.flops_forward_backward_mixed:.3f}",
        )
    return table


def _split_overrides(extra: list[str], parser: argparse.ArgumentParser) -> list[str]:
    bad = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if bad:
        parser.error(f"unrecognized arguments {bad}; recipe overrides look like --model.dim=512")
    return extra


def wide_console() -> Console:
    """Tables are wide: use the terminal's width, or 160 columns when output is not a terminal."""
    return Console(width=shutil.get_terminal_size((160, 24)).columns)


def cmd_flops(args: argparse.Namespace, overrides: list[str]) -> int:
    console = wide_console()
    rows = []
    for recipe in args.recipes:
        cfg = load_config(recipe, overrides)
        seq_len = args.seq_len or cfg.train.seq_len
        console.print(flops_table(cfg, seq_len))
        rows.append((Path(recipe).stem, cfg, size_report(cfg.model, seq_len),
                     size_report(dense_baseline(cfg.model), seq_len)))
    if len(rows) > 1:
        console.print(summary_table(rows))
    return 0


def _loss_and_se(values: dict[str, float], key: str) -> str:
    """`loss +- se` of a loss key ("loss/text": its "se/text"), "-" where the loss is missing."""
    loss, se = values.get(key), values.get("se" + key[4:])
    if loss is None:
        return "-"
    return f"{loss:.4f}" + ("" if se is None or not math.isfinite(se) else f" +- {se:.4f}")


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from mot.train.trainer import train

    recipe = args.recipe or DEMO_RECIPE
    cfg = load_config(recipe, overrides)
    where = str(recipe) + (f" (with overrides {overrides})" if overrides else "")
    console = wide_console()
    main_process = os.environ.get("RANK", "0") == "0"  # set by `accelerate launch` / torchrun
    if main_process:
        console.print(flops_table(cfg, cfg.train.seq_len))
    result = train(cfg, where, resume=args.resume, overwrite=args.overwrite, init_from=args.init_from)
    if not main_process:
        return 0
    table = Table(title=f"{cfg.name}: step {result.step}, run folder {result.run_dir}")
    columns = ["modality", "train loss (last window)", "eval loss", "eval perplexity"]
    if result.final_eval:  # train.final_eval_batches: the larger evaluation of the last step
        columns.append(f"final eval loss +- se ({cfg.train.final_eval_batches} batches)")
    for col in columns:
        table.add_column(col, justify="left" if col == "modality" else "right")
    diffusion = {f"loss/{m.name}" for m in cfg.model.modalities if m.is_diffusion}  # an MSE: no perplexity
    for key in ("loss", *(f"loss/{m.name}" for m in cfg.model.modalities)):
        train_loss, eval_loss = result.train_loss.get(key), result.eval_loss.get(key)
        cells = [f"{train_loss:.4f}" if train_loss is not None else "-",
                 f"{eval_loss:.4f}" if eval_loss is not None else "-",
                 "-" if eval_loss is None or key in diffusion or (key == "loss" and diffusion)
                 else f"{math.exp(eval_loss):.2f}"]
        if result.final_eval:
            cells.append(_loss_and_se(result.final_eval, key))
        table.add_row("all (weighted)" if key == "loss" else key[5:] + (" (diffusion MSE)" if key in diffusion else ""),
                      *cells)
    console.print(table)
    console.print(f"checkpoint: {result.checkpoint}\nloss curves: {result.plot}")
    if args.recipe is None:  # the README's main job: show what the demo model generates
        from mot.generate.demo_eval import write_demo_samples

        report = write_demo_samples(result.run_dir)
        console.print(f"samples: {', '.join(report['pages'])}\ncolour grid: {report['grid']}\n"
                      f"text -> image colour match: {100 * report['rate']:.1f}% of {report['images']} images "
                      f"(chance {100 * report['chance']:.1f}%)")
    return 0


def cmd_compare(args: argparse.Namespace, overrides: list[str]) -> int:
    from mot.compare import compare_runs, markdown_table, train_pairs

    if args.recipe:
        if args.runs:
            raise ConfigError("mot compare: give run folders or --recipe, not both")
        where = str(args.recipe) + (f" (with overrides {overrides})" if overrides else "")
        cfg = load_config(args.recipe, overrides)
        runs = train_pairs(cfg, where, args.seeds, args.resume, args.overwrite)
        out = Path(args.out or Path(cfg.train.out_dir) / f"{cfg.name}-compare")
    else:
        if len(args.runs) < 2:
            raise ConfigError("mot compare: give two or more run folders, or --recipe R.toml")
        if overrides or args.seeds:
            raise ConfigError(f"mot compare: overrides and --seeds {overrides or args.seeds} only apply with --recipe")
        runs, out = args.runs, Path(args.out or "compare")
    if os.environ.get("RANK", "0") != "0":
        return 0
    report = compare_runs(runs, out)
    console = wide_console()
    console.print(markdown_table(report, report["keys"]))
    written = ["compare.png", *([report["differences_plot"]] if "differences_plot" in report else []),
               "compare.md", "compare.json"]
    console.print("written: " + ", ".join(str(out / name) for name in written))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mot", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("flops", help="params and FLOPs per token, MoT against the dense baseline")
    p.add_argument("recipes", nargs="+", help="TOML recipe(s)")
    p.add_argument("--seq-len", type=int, default=0, help="sequence length (default: train.seq_len)")
    p.set_defaults(func=cmd_flops)

    add_data_commands(sub)
    add_generate_commands(sub)
    add_grow_commands(sub)
    add_interop_commands(sub)
    add_serve_commands(sub)

    p = sub.add_parser("train", help="train a recipe (default: the demo recipe)")
    p.add_argument("recipe", nargs="?", default=None, help=f"TOML recipe (default {DEMO_RECIPE.name})")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue from the run's latest checkpoint, or from CKPT (a step-* folder or a run folder)")
    p.add_argument("--overwrite", action="store_true", help="delete the run folder's checkpoints and start again")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from these weights with a fresh optimizer, schedule and data order "
                        "(e.g. the output of mot add-modality)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="MoT against dense: eval loss vs training FLOPs, FLOPs fraction to match")
    p.add_argument("runs", nargs="*", help="finished run folders (runs/NAME); the dense one is the reference")
    p.add_argument("--recipe", default=None, help="train the dense and the MoT variant of this recipe first")
    p.add_argument("--out", default=None, help="output folder (default: compare/, or runs/NAME-compare)")
    p.add_argument("--resume", action="store_true",
                   help="with --recipe: continue each run from its latest checkpoint (a run stopped by SIGINT / "
                        "SIGTERM saves one), start those not begun")
    p.add_argument("--overwrite", action="store_true", help="with --recipe: retrain runs that already exist")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="with --recipe: train both variants for each of these train.seed values; the report gives "
                        "the band over seeds; runs are named NAME-dense-sSEED, NAME-mot-sSEED (default: the recipe's "
                        "seed, runs NAME-dense, NAME-mot)")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = _split_overrides(extra, parser)
    try:
        return args.func(args, overrides)
    except (ConfigError, TokenizerError, PrepareError, CheckpointError, CompareError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except TrainingStopped as err:
        print(f"mot: {err}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
