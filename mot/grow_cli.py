"""`mot grow`, `mot upcycle`, `mot add-modality`: derive a bigger model's checkpoint from a trained one (mot/grow.py).

    mot grow CKPT --param-tokens N [--modality M] --out DIR
    mot upcycle DENSE_CKPT --out DIR [--untie attn,ffn,norm]
    mot add-modality CKPT --name speech --vocab-size N --from text --out DIR [--tokenizer PATH]

CKPT is a step-* folder or a run folder (its latest checkpoint). DIR becomes a run folder holding the new checkpoint
and its recipe: continue with `mot train DIR/recipe.toml --resume` (grow, upcycle).
"""

from __future__ import annotations

import argparse

from mot import grow as ops
from mot.config import ConfigError
from mot.flops import param_counts


def _report(source: ops.Source, cfg, path, operation: str) -> None:
    before, after = param_counts(source.cfg.model)[0], param_counts(cfg.model)[0]
    print(f"mot {operation}: {source.path} -> {path}")
    print(f"  parameters: {before:,} -> {after:,} ({after / before:.2f}x)")
    recipe = path.parent.parent / "recipe.toml"
    if operation == "add-modality":
        print(f"  weights and config only (the vocabulary changed: prepare shards for it first); start a run from "
              f"them with the recipe {recipe} and the trainer's --init-from {path}")
    else:
        print(f"  continue training: mot train {recipe} --resume   (optimizer, schedule and data position carried)")


def _no_overrides(command: str, overrides: list[str]) -> None:
    if overrides:
        raise ConfigError(f"mot {command}: unexpected arguments {overrides}")


def cmd_grow(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides("grow", overrides)
    source = ops.read_source(args.checkpoint)
    cfg, state, optimizer = ops.grow(source, args.param_tokens, args.modality, seed=args.seed)
    details = {"param_tokens": args.param_tokens, "modality": args.modality or "all"}
    path = ops.write_derived(args.out, source, cfg, state, optimizer, "grow", details)
    _report(source, cfg, path, "grow")
    return 0


def cmd_upcycle(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides("upcycle", overrides)
    untie = [part.strip() for part in args.untie.split(",") if part.strip()]
    source = ops.read_source(args.checkpoint)
    cfg, state, optimizer = ops.upcycle(source, untie)
    path = ops.write_derived(args.out, source, cfg, state, optimizer, "upcycle", {"untie": untie})
    _report(source, cfg, path, "upcycle")
    return 0


def cmd_add_modality(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides("add-modality", overrides)
    source = ops.read_source(args.checkpoint)
    cfg, state, optimizer = ops.add_modality(source, args.name, args.vocab_size, args.from_modality,
                                             args.tokenizer, seed=args.seed)
    details = {"modality": args.name, "vocab_size": args.vocab_size, "from": args.from_modality}
    path = ops.write_derived(args.out, source, cfg, state, optimizer, "add-modality", details)
    _report(source, cfg, path, "add-modality")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grow", help="more Pattention parameter tokens, the same function (TokenFormer scaling)")
    p.add_argument("checkpoint", help="a step-* folder or a run folder (its latest checkpoint)")
    p.add_argument("--param-tokens", type=int, required=True, metavar="N",
                   help="new tokens per attention projection (the FFN gets model.ffn_token_multiple times N)")
    p.add_argument("--modality", default=None, help="grow this modality's tower only (default: all)")
    p.add_argument("--out", required=True, help="new run folder for the grown checkpoint and its recipe")
    p.add_argument("--seed", type=int, default=0, help="seed of the new tokens' values (keys start at zero)")
    p.set_defaults(func=cmd_grow)

    p = sub.add_parser("upcycle", help="a dense checkpoint as MoT: the dense weights copied into every tower")
    p.add_argument("checkpoint", help="a dense (model.untie = []) step-* folder or run folder")
    p.add_argument("--out", required=True, help="new run folder for the MoT checkpoint and its recipe")
    p.add_argument("--untie", default="attn,ffn,norm", help="parts to untie, comma-separated (default: all)")
    p.set_defaults(func=cmd_upcycle)

    p = sub.add_parser("add-modality", help="a new modality tower initialised from an existing one")
    p.add_argument("checkpoint", help="a step-* folder or a run folder")
    p.add_argument("--name", required=True, help="the new modality's name")
    p.add_argument("--vocab-size", type=int, required=True, help="ids the new modality owns")
    p.add_argument("--from", dest="from_modality", required=True, help="the modality whose tower is copied")
    p.add_argument("--tokenizer", default="", help="model.modalities.*.tokenizer of the new modality")
    p.add_argument("--out", required=True, help="new run folder for the checkpoint and its recipe")
    p.add_argument("--seed", type=int, default=0, help="seed of the new embedding and head rows")
    p.set_defaults(func=cmd_add_modality)
