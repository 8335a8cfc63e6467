"""Grow without retraining (TokenFormer's incremental scaling) on a Pattention MoT: eval loss against training FLOPs.

    python3 bench/grow.py [--recipe recipes/demo_gpu.toml] [--param-tokens 256] [--growth 2] [--before 150]
                          [--after 150] [--eval-every 25] [--out runs/grow-bench] [--key=value ...]
    python3 bench/grow.py --smoke        # CPU, about a minute: tiny model, tiny synthetic corpus (tests/runs.py)

Three runs of the same recipe with model.projection = "pattention", one schedule of before + after steps each:
- small:   param_tokens = P for the whole schedule;
- grown:   the small run's checkpoint at step `before`, grown to growth x P tokens (`mot grow`: zero keys, so the
           function is unchanged), resumed with the same optimizer moments, schedule and data position;
- scratch: growth x P tokens from step 0.
The grown run's curve is assembled in `grown-curve/`: the small run's rows up to the growth, then the
grown run's rows, FLOPs counted at the small model's cost before the growth and the grown one's after it
(the same count the trainer now keeps itself, step by step, across a grown checkpoint).
Writes OUT/compare/{compare.png,md,json} (the scratch run is the reference: the FLOPs fraction at which the
others reach its final loss), and OUT/grow.md with every run's eval loss against training FLOPs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mot import grow as ops  # noqa: E402
from mot.compare import compare_runs, markdown_table  # noqa: E402
from mot.config import RunConfig, config_to_dict, load_config  # noqa: E402
from mot.flops import param_counts, size_report  # noqa: E402
from mot.runs import checkpoint_name  # noqa: E402
from mot.train.metrics_log import read_log  # noqa: E402
from mot.train.trainer import Trainer  # noqa: E402


def pattention_recipe(args: argparse.Namespace) -> RunConfig:
    if args.smoke:
        sys.path.insert(0, str(ROOT))
        from tests.runs import make_shards, run_config

        shards = make_shards(Path(tempfile.mkdtemp(prefix="mot-grow-shards-")))
        cfg = run_config(shards, Path(args.out), steps=args.before + args.after, eval_every=args.eval_every,
                         checkpoint_every=0, log_every=args.eval_every)
    else:
        cfg = load_config(args.recipe, args.overrides)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, steps=args.before + args.after, eval_every=args.eval_every, checkpoint_every=0,
            out_dir=args.out, warmup_steps=min(cfg.train.warmup_steps, args.before)))
    model = dataclasses.replace(cfg.model, projection="pattention", param_tokens=args.param_tokens,
                                param_tokens_per_modality=[], param_tokens_tau=[])
    return ops._checked(dataclasses.replace(cfg, model=model))


def flops_per_token(cfg: RunConfig) -> float:
    """What the trainer charges per token (causal attention, mixed over modalities)."""
    return size_report(cfg.model, cfg.train.seq_len, attention="causal").flops_forward_backward_mixed


def grown_curve(small_dir: Path, grown_dir: Path, out: Path, step: int, tokens_at_growth: int,
                small_cfg: RunConfig, grown_cfg: RunConfig) -> Path:
    """A run folder for `mot compare` with the small run's rows up to the growth and the grown run's after it,
    the latter's FLOPs recounted: tokens before the growth at the small model's cost, after it at the grown one's."""
    small_fpt, grown_fpt = flops_per_token(small_cfg), flops_per_token(grown_cfg)
    rows = [r for r in read_log(small_dir / "log.jsonl") if r["step"] <= step]
    for row in read_log(grown_dir / "log.jsonl"):
        if row["step"] > step and "tokens" in row:
            row["flops"] = tokens_at_growth * small_fpt + (row["tokens"] - tokens_at_growth) * grown_fpt
            rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    named = dataclasses.replace(grown_cfg, name=f"grown at step {step}")
    (out / "config.json").write_text(json.dumps(config_to_dict(named), indent=1))
    return out


def curves_markdown(runs: dict[str, Path], cfgs: dict[str, RunConfig], report: dict) -> str:
    lines = ["# Grow without retraining: eval loss against training FLOPs", ""]
    lines += ["| run | params | param tokens (attn / ffn) | steps | training FLOPs | final eval loss |",
              "|---|---|---|---|---|---|"]
    for label, folder in runs.items():
        m = cfgs[label].model
        evals = [r for r in read_log(folder / "log.jsonl") if r["kind"] == "eval"]
        lines.append(f"| {label} | {param_counts(m)[0] / 1e6:.2f}M | {m.param_tokens_of('attn')} / "
                     f"{m.param_tokens_of('ffn')} | {evals[-1]['step']} | {evals[-1]['flops']:.3g} | "
                     f"{evals[-1]['loss']:.4f} |")
    table = markdown_table(report, report["keys"]).replace("Reference (dense)", "Reference (trained from scratch)")
    lines += ["", table, "## Every evaluation", ""]
    modalities = [m.name for m in next(iter(cfgs.values())).model.modalities]
    lines += ["| run | step | training FLOPs | eval loss | " + " | ".join(modalities) + " |",
              "|---" * (4 + len(modalities)) + "|"]
    for label, folder in runs.items():
        for r in (r for r in read_log(folder / "log.jsonl") if r["kind"] == "eval"):
            per = " | ".join(f"{r.get(f'loss/{m}', float('nan')):.4f}" for m in modalities)
            lines.append(f"| {label} | {r['step']} | {r['flops']:.4g} | {r['loss']:.4f} | {per} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo_gpu.toml"))
    parser.add_argument("--param-tokens", type=int, default=0, help="tokens before growth (default 256; smoke 8)")
    parser.add_argument("--growth", type=int, default=2, help="token multiple at the growth")
    parser.add_argument("--before", type=int, default=0, help="steps before growth (default 150; smoke 6)")
    parser.add_argument("--after", type=int, default=0, help="steps after growth (default 150; smoke 6)")
    parser.add_argument("--eval-every", type=int, default=0, help="default 25; smoke 3")
    parser.add_argument("--out", default="", help="default runs/grow-bench (smoke: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the whole pipeline")
    args, args.overrides = parser.parse_known_args()
    small_defaults = (8, 6, 6, 3) if args.smoke else (256, 150, 150, 25)
    for key, default in zip(("param_tokens", "before", "after", "eval_every"), small_defaults, strict=True):
        setattr(args, key, getattr(args, key) or default)
    args.out = args.out or (tempfile.mkdtemp(prefix="mot-grow-") if args.smoke else "runs/grow-bench")
    out = Path(args.out)
    start = time.perf_counter()

    small_cfg = dataclasses.replace(pattention_recipe(args), name="small")
    small = Trainer(small_cfg, "bench/grow.py", overwrite=True, progress=not args.smoke)
    small.fit(until=args.before)  # evaluates and checkpoints at the growth step
    source = ops.read_source(small.state.run_dir / "checkpoints" / checkpoint_name(args.before))
    small.fit()  # the small model to the end of the schedule, for reference
    del small

    grown_cfg, state, optimizer = ops.grow(source, args.param_tokens * args.growth)
    ops.write_derived(out / "grown", source, grown_cfg, state, optimizer, "grow", {"growth": args.growth})
    grown_cfg = load_config(out / "grown" / "recipe.toml")
    Trainer(grown_cfg, "bench/grow.py", resume=True, progress=not args.smoke).fit()

    scratch_model = dataclasses.replace(small_cfg.model, param_tokens=args.param_tokens * args.growth)
    scratch_cfg = dataclasses.replace(small_cfg, name="scratch", model=scratch_model)
    Trainer(scratch_cfg, "bench/grow.py", overwrite=True, progress=not args.smoke).fit()

    curve = grown_curve(out / "small", out / "grown", out / "grown-curve", args.before,
                        source.meta["tokens_seen"], small_cfg, grown_cfg)
    runs = {"scratch": out / "scratch", f"grown at step {args.before}": curve, "small": out / "small"}
    cfgs = dict(zip(runs, (scratch_cfg, grown_cfg, small_cfg), strict=True))
    report = compare_runs(list(runs.values()), out / "compare")
    (out / "grow.md").write_text(curves_markdown(runs, cfgs, report))
    print((out / "grow.md").read_text())
    print(f"written: {out / 'grow.md'}, {out / 'compare' / 'compare.png'} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
