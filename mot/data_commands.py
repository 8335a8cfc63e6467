"""The data side of the `mot` command: demo corpus, tokenizer train/encode/decode, prepare.

    mot demo-data [--out data/demo] [--scale 1.0] [--no-speech]
    mot tokenizer train text|image|speech --data DOCS --config tokenizers/X.toml --out DIR
    mot tokenizer encode text|image|speech --tokenizer DIR INPUT          (prints the ids as JSON)
    mot tokenizer decode text|image|speech --tokenizer DIR --ids IDS --out FILE
    mot prepare --recipe R.toml --data DOCS --tokenizers DIR --out DIR [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mot.data.batch_encode import DEFAULT_IMAGE_PRECISION, PRECISIONS
from mot.data.prepare import prepare_for_recipe
from mot.tokenize.base import TokenizerError
from mot.tokenize.load import load_tokenizer

MODALITIES = ("text", "image", "speech")


def _segments(data: str, kind: str) -> list:
    """Every segment of one kind ("text", "image", "audio") in a documents source."""
    from mot.data.sources import open_documents

    return [seg for doc in tqdm(open_documents(data), desc=f"reading {kind} from {data}", leave=False)
            for seg in doc.segments if seg.type == kind]


def cmd_demo_data(args: argparse.Namespace, overrides: list[str]) -> int:
    from mot.data.demo import generate_demo_corpus

    summary = generate_demo_corpus(args.out, scale=args.scale, seed=args.seed, speech=not args.no_speech,
                                   overwrite=args.overwrite)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_tokenizer_train(args: argparse.Namespace, overrides: list[str]) -> int:
    start = time.perf_counter()
    if args.modality == "text":
        from mot.tokenize.text import TextTokenizer, load_text_config

        cfg = load_text_config(args.config, overrides)
        texts = [seg.text for seg in _segments(args.data, "text")]
        tok = TextTokenizer.train(texts, cfg.vocab_size, min_frequency=cfg.min_frequency)
        tok.save(args.out)
        report = {"texts": len(texts), "vocab_size": tok.vocab_size}
    elif args.modality == "image":
        from mot.data.media import load_image
        from mot.tokenize.image import load_vqgan_config
        from mot.tokenize.vqgan_train import train_vqgan

        cfg = load_vqgan_config(args.config, overrides)
        images = torch.stack([load_image(seg, cfg.resolution) for seg in _segments(args.data, "image")])
        held_out = max(1, len(images) // 20)  # 5% held out for PSNR and codebook usage
        metrics = train_vqgan(cfg, images[held_out:], args.out, eval_images=images[:held_out])
        report = {"images": len(images), "held_out": held_out, "eval": metrics.get("eval")}
    else:
        from mot.tokenize.speech import SpeechTokenizer, load_audio, load_speech_config
        from mot.tokenize.speech_metrics import mel_reconstruction_error

        cfg = load_speech_config(args.config, overrides)
        paths = [seg.path for seg in _segments(args.data, "audio")]
        if not paths:
            raise TokenizerError(f"{args.data}: no audio segments to train the speech tokenizer on")
        held_out = max(1, len(paths) // 20)
        tok = SpeechTokenizer.train(paths[held_out:], cfg)
        tok.save(args.out)
        held_out_audio = [load_audio(p, cfg.sample_rate) for p in paths[:held_out]]
        report = {"clips": len(paths), "held_out": held_out,
                  "mel_error": mel_reconstruction_error(tok, held_out_audio)}
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps({"modality": args.modality, "out": str(args.out), **report}, indent=1, default=str))
    return 0


def cmd_tokenizer_encode(args: argparse.Namespace, overrides: list[str]) -> int:
    tok = load_tokenizer(args.modality, args.tokenizer)
    if args.modality == "text":
        ids = tok.encode(args.input)
    elif args.modality == "image":
        from mot.data.documents import ImageSegment
        from mot.data.media import load_image

        ids = tok.encode(load_image(ImageSegment(path=Path(args.input)), tok.config.resolution))
    else:
        ids = tok.encode_file(args.input)
    print(json.dumps(ids.tolist()))
    return 0


def cmd_tokenizer_decode(args: argparse.Namespace, overrides: list[str]) -> int:
    tok = load_tokenizer(args.modality, args.tokenizer)
    looks_like_ids = args.ids.lstrip().startswith("[") or args.ids.replace(" ", "").isdigit()
    text = args.ids if looks_like_ids else Path(args.ids).read_text()
    ids = torch.tensor(json.loads(text) if text.strip().startswith("[") else [int(t) for t in text.split()])
    with torch.no_grad():
        out = tok.decode(ids)
    if args.modality == "text":
        if args.out:
            Path(args.out).write_text(out)
        print(out)
        return 0
    if not args.out:
        raise TokenizerError(f"decoding {args.modality} needs --out FILE (.png or .wav)")
    if args.modality == "image":
        from torchvision.utils import save_image

        save_image(out, args.out)
    else:
        import soundfile

        soundfile.write(args.out, out.numpy(), tok.config.sample_rate, subtype="PCM_16")
    print(f"wrote {args.out}")
    return 0


def cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    from mot.config import load_config

    cfg = load_config(args.recipe, overrides)
    stats = prepare_for_recipe(cfg, args.recipe, args.data, args.tokenizers, args.out, workers=args.workers,
                               shard_size=args.shard_size, max_doc_tokens=args.max_doc_tokens, device=args.device,
                               image_precision=args.image_precision, compile=args.compile,
                               encode_batch_size=args.encode_batch_size)
    if stats.processes == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(stats.as_dict(), indent=1, default=str))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-data", help="generate the bundled demo corpus (offline, deterministic)")
    p.add_argument("--out", default="data/demo")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the number of images and spoken captions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-speech", action="store_true", help="leave out the espeak-ng spoken captions")
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus in --out")
    p.set_defaults(func=cmd_demo_data)

    tok = sub.add_parser("tokenizer", help="train, encode with, or decode with a modality tokenizer")
    tsub = tok.add_subparsers(dest="action", required=True)
    p = tsub.add_parser("train", help="train a tokenizer on a documents source")
    p.add_argument("modality", choices=MODALITIES)
    p.add_argument("--data", required=True, help="documents (JSONL file or folder, local HF datasets source)")
    p.add_argument("--config", required=True, help="tokenizer config, e.g. tokenizers/text_demo.toml")
    p.add_argument("--out", required=True, help="folder to write the tokenizer to")
    p.set_defaults(func=cmd_tokenizer_train)
    p = tsub.add_parser("encode", help="print the local ids of a text, an image file or an audio file")
    p.add_argument("modality", choices=MODALITIES)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("input", help="the text itself, or an image / audio file")
    p.set_defaults(func=cmd_tokenizer_encode)
    p = tsub.add_parser("decode", help="turn ids back into text, a PNG or a WAV")
    p.add_argument("modality", choices=MODALITIES)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--ids", required=True, help="ids as JSON list or whitespace-separated, or a file holding them")
    p.add_argument("--out", default="", help="output file (.png for images, .wav for speech)")
    p.set_defaults(func=cmd_tokenizer_decode)

    p = sub.add_parser(
        "prepare", help="tokenize a documents source into packed-loader shards",
        description="Tokenize documents (JSONL, webdataset-style tars, parquet, HF datasets) into shards. With a "
                    "GPU, workers decode and the GPU encodes images and speech; for several GPUs run it under "
                    "`torchrun --nproc-per-node N -m mot.cli prepare ...`: one process per GPU, one manifest.")
    p.add_argument("--recipe", required=True, help="recipe whose model.modalities lay out the unified vocabulary")
    p.add_argument("--data", required=True, help="a JSONL file or folder, .tar shards, parquet, an HF dataset, or "
                   "\"synthetic:KIND?samples=N&seed=S&...\" (mot/data/synthetic_source.py)")
    p.add_argument("--tokenizers", required=True, help="folder with one tokenizer folder per modality name")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: this process's share of the cores, one left for a GPU; "
                        "0: decode in this process)")
    p.add_argument("--device", default="auto", help="where images and speech are encoded: auto, cpu, cuda, cuda:N")
    p.add_argument("--image-precision", default=DEFAULT_IMAGE_PRECISION, choices=PRECISIONS,
                   help="the VQGAN encoder's arithmetic on CUDA (see README for how often codes equal the CPU's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the VQGAN encoder (CUDA)")
    p.add_argument("--encode-batch-size", type=int, default=None,
                   help="images per encoder call on CUDA (default: 64 of 512 px, more of smaller ones)")
    p.add_argument("--shard-size", type=int, default=1000, help="documents per shard")
    p.add_argument("--max-doc-tokens", type=int, default=0, help="skip longer documents (default model.max_seq_len)")
    p.set_defaults(func=cmd_prepare)
