"""`mot import-hf`, `mot export-hf`: Hugging Face Chameleon folders <-> mot run folders (mot/interop/chameleon.py).

    mot import-hf CHAMELEON_FOLDER --out RUN [--dtype bf16] [--vqgan vqgan.ckpt --vqgan-yaml vqgan.yaml]
    mot export-hf RUN --out FOLDER

RUN is then a run folder that `mot generate`, `mot upcycle` and `mot train --init-from` accept.
"""

from __future__ import annotations

import argparse

import torch

from mot.config import ConfigError
from mot.flops import param_counts
from mot.interop.chameleon import export_hf, import_hf

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cmd_import_hf(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise ConfigError(f"mot import-hf: unexpected arguments {overrides}")
    if bool(args.vqgan) != bool(args.vqgan_yaml):
        raise ConfigError("mot import-hf: --vqgan and --vqgan-yaml go together (taming's checkpoint and config)")
    path = import_hf(args.folder, args.out, DTYPES[args.dtype], (args.vqgan, args.vqgan_yaml) if args.vqgan else None)
    from mot.runs import load_for_inference

    _, cfg, tokenizers = load_for_inference(path)
    print(f"mot import-hf: {args.folder} -> {path}")
    print(f"  dense model, {param_counts(cfg.model)[0]:,} parameters; text tokenizer: {tokenizers or 'none found'}")
    print(f"  next: mot upcycle {args.out} --out RUN_MOT, or mot train RECIPE --init-from {path}")
    return 0


def cmd_export_hf(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise ConfigError(f"mot export-hf: unexpected arguments {overrides}")
    out = export_hf(args.run, args.out)
    print(f"mot export-hf: {args.run} -> {out} (ChameleonForConditionalGeneration.from_pretrained loads it)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-hf", help="a Hugging Face Chameleon folder as a mot run folder (dense model)")
    p.add_argument("folder", help="local folder with config.json and *.safetensors (and tokenizer.json)")
    p.add_argument("--out", required=True, help="new run folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' dtype in the run folder")
    p.add_argument("--vqgan", default="", help="the taming VQGAN checkpoint released with the model (its decoder "
                                               "turns generated codes into images; the VQVAE has none)")
    p.add_argument("--vqgan-yaml", default="", help="its taming YAML config")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("export-hf", help="a dense run as a Hugging Face Chameleon folder")
    p.add_argument("run", help="a run folder (its latest checkpoint) or a step-* folder")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export_hf)
