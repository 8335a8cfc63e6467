"""`mot prepare` throughput (issue 17): synthetic webdataset-style tars -> token shards, and what bounds it.

    python bench/prepare.py [--case demo|chameleon|both] [--samples N] [--chameleon-samples N] [--workers W]
                            [--device auto|cpu|cuda] [--precisions fp32 tf32 bf16] [--compile off on]
                            [--pipeline fp32 bf16 bf16+compile] [--json OUT] [--log [TAG]] [--out-dir DIR] [--smoke]

The data is generated here, inside the command, by mot/data/synthetic_docs.py (nothing is downloaded); every
sample gives one document per pair order (image-text and text-image, as `mot prepare` makes of tar shards):

    demo       64 px PNG + caption, a fraction with 1-3 s of speech; the shipped demo tokenizers
               (tokenizers/demo: text BPE, 64 px VQGAN, speech units) and recipes/demo.toml's vocabulary
    chameleon  JPEG of 480..800 px sides + json caption, brought to 512 px (center crop); the VQGAN of
               tokenizers/vqgan_chameleon.toml (random weights: 32 x 32 = 1024 codes of 8192) + the demo text
               BPE, in Chameleon's 65,536-id vocabulary

Per case it measures:

    decode         `decode_image` alone in this process (images/s; x workers as an estimate), and prepare's real
                   decode step (`DocumentDecoder.decode` over pieces of 64 documents, as the workers run it) in a
                   spawn pool of --workers processes, results back through shared memory
    encoder alone  `ImageBatchEncoder` on uint8 (B, 3, R, R) already on the device, warmed up, per precision x
                   compile x channels-last; FLOPs per image counted with FlopCounterMode (encoder + quant_conv,
                   and the quantizer's distance matmul), achieved TFLOP/s and % of 989 TFLOP/s (the H200's dense
                   bf16 peak: the basis for every row, fp32 and tf32 too)
    pipeline       `prepare(...)` end to end (fresh worker pool each run, as `mot prepare`) per --pipeline
                   setting (default fp32, `mot prepare`'s; chameleon on CUDA also bf16 and bf16+compile):
                   documents/s, tokens/s, images/s, where the main process waited (PrepareStats.profile), the
                   GPU's busy share, what bounds the run, and pipeline / encoder-alone images/s

Timings are repeated (--repeats, --pipeline-repeats): median and min..max. Elapsed time per phase is printed.
With a GPU the defaults (demo 50,000 samples = 100,000 documents; chameleon 2,000 samples = 4,000 512 px
images) take about 8 minutes on an H200 with 16 cores, generation included; prepare repeats that would end past
--budget-s (500 s) are skipped and listed.
--log writes the printed report and the JSON to bench/results/prepare_<TAG>_<date>.{txt,json} (TAG: given,
else the device, e.g. h200 or cpu2). --smoke: a few dozen samples on the CPU, the chameleon VQGAN at 64 px
(`--resolution 64` override) and small JPEGs: checks the script in well under a minute.

    python bench/prepare.py --smoke
    python bench/prepare.py --device cpu --samples 3000 --chameleon-samples 24 --log cpu2    # 2-core CPU row
    python bench/prepare.py --log                                                           # H200: defaults
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import tomllib
from functools import partial
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mot.config import ModalityConfig, ModelConfig, load_config  # noqa: E402
from mot.data import pipeline_worker  # noqa: E402
from mot.data.batch_encode import (  # noqa: E402
    CPU_BATCH_PIXELS,
    CUDA_BATCH_PIXELS,
    PRECISIONS,
    ImageBatchEncoder,
    resolve_device,
)
from mot.data.documents import ImageSegment  # noqa: E402
from mot.data.encode import vocab_layout  # noqa: E402
from mot.data.media import decode_image  # noqa: E402
from mot.data.pipeline_worker import pieces_for  # noqa: E402
from mot.data.prepare import (
    default_workers,  # noqa: E402
    prepare,  # noqa: E402
)
from mot.data.sources import open_documents  # noqa: E402
from mot.data.synthetic_docs import write_shards  # noqa: E402
from mot.tokenize.image import ImageTokenizer, load_vqgan_config  # noqa: E402
from mot.tokenize.load import load_tokenizer  # noqa: E402
from mot.vocab import UnifiedVocab  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_TOKENIZERS = ROOT / "tokenizers" / "demo"
CHAMELEON_VQGAN = ROOT / "tokenizers" / "vqgan_chameleon.toml"
PEAK_TFLOPS = 989.4  # H200 (and H100 SXM) dense bf16 without sparsity: the basis of "% peak" in every row
CASES = ("demo", "chameleon")
# Samples per case: (GPU, CPU, --smoke). A sample is one image (+ caption, + sometimes audio): two documents.
DEFAULT_SAMPLES = {"demo": (50_000, 2000, 16), "chameleon": (2000, 24, 4)}


class Report:
    """Prints each line and keeps it for --log."""

    def __init__(self):
        self.lines: list[str] = []
        self.start = time.perf_counter()

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def progress(self, line: str) -> None:
        self(f"[{time.perf_counter() - self.start:7.1f}s] {line}")


def importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def fmt_rate(s: dict | None, width: int = 10) -> str:
    """median and min..max of a spread."""
    if not s:
        return f"{'-':>{width}}{'':>22}"
    digits = 0 if s["median"] >= 100 else 1 if s["median"] >= 10 else 2
    rng = f"{s['min']:.{digits}f}..{s['max']:.{digits}f}"
    return f"{s['median']:>{width}.{digits}f}  {rng:<20}"


def num(x: float) -> str:
    """A rate with about 3 significant digits, and no more than 0 decimals from 100 up."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- data and tokenizers


def generate(case: str, samples: int, out: Path, args, report: Report) -> dict:
    """The case's tars under `out`, reused when a previous run wrote the same ones there."""
    options = ({"audio_fraction": args.audio_fraction} if case == "demo"
               else {"min_side": args.min_side, "max_side": args.max_side})
    workers = max(1, args.gen_workers)
    per_tar = max(1, min(1000, math.ceil(samples / (2 * workers))))
    spec = {"kind": case, "samples": samples, "per_tar": per_tar, "seed": args.seed, **options}
    marker = out / "generated.json"
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == spec:
        summary = json.loads(marker.read_text())
        report.progress(f"{case}: reusing {samples} samples in {out}")
        return {**summary, "reused": True}
    for old in out.glob("*.tar") if out.is_dir() else []:
        old.unlink()
    step = [0]

    def progress(done: int, total: int) -> None:
        if done * 10 // total > step[0] or done == total:
            step[0] = done * 10 // total
            report.progress(f"{case}: generated {done}/{total} tars")

    start = time.perf_counter()
    tars = write_shards(case, out, samples, per_tar=per_tar, workers=workers, seed=args.seed, progress=progress,
                        **options)
    summary = {"spec": spec, "tars": len(tars), "samples": sum(t["samples"] for t in tars),
               "images": sum(t["images"] for t in tars), "audio": sum(t["audio"] for t in tars),
               "audio_seconds": round(sum(t["audio_seconds"] for t in tars), 1),
               "bytes": sum(t["bytes"] for t in tars), "seconds": round(time.perf_counter() - start, 2)}
    marker.write_text(json.dumps(summary, indent=1))
    return {**summary, "reused": False}


def chameleon_tokenizer_folder(work: Path, resolution: int, seed: int) -> Path:
    """The Chameleon-shaped VQGAN (random weights, seeded) saved once, so every worker loads the same one."""
    folder = work / "tokenizers" / f"chameleon_{resolution}px_seed{seed}" / "image"
    if not (folder / "vqgan.safetensors").is_file():
        torch.manual_seed(seed)
        ImageTokenizer(load_vqgan_config(CHAMELEON_VQGAN, [f"resolution={resolution}"])).save(folder)
    return folder


def case_setup(case: str, work: Path, args, speech: bool) -> dict:
    """Tokenizer folders, vocabulary and prepare's decode options of a case."""
    if case == "demo":
        model = load_config(ROOT / "recipes" / "demo.toml").model
        folders = {m: DEMO_TOKENIZERS / m for m in (("text", "image", "speech") if speech else ("text", "image"))}
        max_doc_tokens = model.max_seq_len  # what `mot prepare --recipe recipes/demo.toml` uses
    else:
        # Chameleon's layout: 65,536 ids = text + 8192 image codes + 8 special tokens.
        model = ModelConfig(modalities=[ModalityConfig("text", 65536 - 8192 - 8), ModalityConfig("image", 8192)])
        folders = {"text": DEMO_TOKENIZERS / "text",
                   "image": chameleon_tokenizer_folder(work, args.resolution, args.seed)}
        max_doc_tokens = 4096
    # Given explicitly: prepare's defaults look for `resolution` / `sample_rate` attributes of the tokenizers,
    # which ImageTokenizer and SpeechTokenizer keep in their `config` only (left alone, images stay at their size).
    image_cfg = load_vqgan_config(folders["image"] / "vqgan.toml")
    sample_rate = (tomllib.loads((folders["speech"] / "speech_units.toml").read_text()).get("sample_rate", 16_000)
                   if "speech" in folders else None)
    options = {"max_doc_tokens": max_doc_tokens, "image_resolution": image_cfg.resolution,
               "sample_rate": sample_rate, "image_policy": image_cfg.preprocess}
    return {"vocab": UnifiedVocab(model), "folders": {m: str(f) for m, f in folders.items()},
            "loaders": {m: partial(load_tokenizer, m, str(f)) for m, f in folders.items()},
            "options": options, "resolution": image_cfg.resolution}


# ---------------------------------------------------------------- decode


def _noop(x):
    return x


def time_decode(docs: list, setup: dict, workers: int, args, limits: tuple[int, int], report: Report) -> dict:
    """decode_image in this process; DocumentDecoder.decode (prepare's decode step) in a pool of `workers`."""
    opts = setup["options"]
    seen, images = set(), []
    for doc in docs:  # each image once (a sample's two documents share it)
        for seg in doc.segments:
            if isinstance(seg, ImageSegment) and seg.data not in seen:
                seen.add(seg.data)
                images.append(seg)
    images = images[: limits[0]]
    torch.set_num_threads(1)  # what a worker gets (quiet_worker_threads)
    single = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for seg in images:
            decode_image(seg, opts["image_resolution"], opts["image_policy"])
        single.append(len(images) / (time.perf_counter() - start))
    torch.set_num_threads(args.threads)
    report.progress(f"decode_image: {len(images)} images x {args.repeats} in this process")

    subset = docs[: limits[1]]
    per_piece = pieces_for(setup["options"]["image_resolution"])  # as prepare's CUDA mode splits chunks
    pieces = [subset[i : i + per_piece] for i in range(0, len(subset), per_piece)]
    ctx = torch.multiprocessing.get_context("spawn")
    start = time.perf_counter()
    docs_rate, images_rate, counts = [], [], {}
    with ctx.Pool(workers, pipeline_worker._init_worker,
                  (setup["loaders"], vocab_layout(setup["vocab"]), opts, False)) as pool:
        pool.map(_noop, range(workers), chunksize=1)  # every worker started and its tokenizers loaded
        startup = time.perf_counter() - start
        for _ in range(args.repeats):  # the tars were just written: in the page cache
            start = time.perf_counter()
            counts = {"images": 0, "audio": 0, "documents": 0}
            for chunk in pool.imap(_decode_piece, list(enumerate(pieces)), chunksize=1):
                counts["images"] += chunk.counts["images"]
                counts["audio"] += chunk.counts["audio"]
                counts["documents"] += len(chunk.documents)
                del chunk
            seconds = time.perf_counter() - start
            docs_rate.append(counts["documents"] / seconds)
            images_rate.append(counts["images"] / seconds)
    report.progress(f"DocumentDecoder.decode: {len(subset)} documents x {args.repeats} in a pool of {workers} "
                    f"(started in {startup:.1f}s)")
    single_s = spread(single)
    return {"single_images": len(images), "single_images_per_s": single_s,
            "estimate_images_per_s": {k: v * workers if k != "values" else [x * workers for x in v]
                                      for k, v in single_s.items()},
            "pool_documents": len(subset), "pool_counts": counts, "pool_startup_s": round(startup, 2),
            "pool_documents_per_s": spread(docs_rate), "pool_images_per_s": spread(images_rate)}


def _decode_piece(item):
    index, documents = item
    return pipeline_worker._decode(index, documents)


# ---------------------------------------------------------------- encoder alone


def count_flops(tokenizer, resolution: int) -> dict:
    """FLOPs per image of encoder + quant_conv and of the quantizer's distances, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    enc = ImageBatchEncoder(tokenizer, "cpu", channels_last=False, batch_size=1)
    pre, quant = copy.deepcopy(enc.pre_quant).to("meta"), copy.deepcopy(enc.quantize).to("meta")
    x = torch.empty(1, 3, resolution, resolution, device="meta")
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            z = pre(x)
        encoder = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            try:
                quant(z)
                quantizer = counter.get_total_flops()
            except (NotImplementedError, RuntimeError):  # an op without a meta kernel: count the matmul by hand
                quantizer = 2 * z.shape[2] * z.shape[3] * z.shape[1] * tokenizer.vocab_size
    return {"encoder": encoder, "quantizer": quantizer}


def time_encoder(tokenizer, device: torch.device, precision: str, compiled: bool, channels_last: bool, batch: int,
                 resolution: int, args) -> dict:
    if compiled:
        torch._dynamo.reset()  # every encoder is a new module: stay below dynamo's recompile limit
    enc = ImageBatchEncoder(tokenizer, device, precision, compiled, channels_last, batch)
    x = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8, device=device)
    start = time.perf_counter()
    enc(x)  # compiles, initialises cuDNN
    sync(device)
    first = one = time.perf_counter() - start
    if compiled or device.type == "cuda":  # the first call is no estimate of the next ones
        start = time.perf_counter()
        enc(x)
        sync(device)
        one = time.perf_counter() - start
    iters = max(1, min(200, round(args.encoder_seconds / max(one, 1e-6))))
    rates = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            codes = enc(x)
        sync(device)
        rates.append(batch * iters / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    del enc, x, codes
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {"precision": enc_precision(precision, device), "compile": compiled,
            "channels_last": channels_last and device.type == "cuda", "batch": batch, "iters": iters,
            "first_call_s": round(first, 2), "images_per_s": spread(rates), "peak_gib": round(peak, 1)}


def enc_precision(precision: str, device: torch.device) -> str:
    return precision if device.type == "cuda" else "fp32"


def encoder_grid(device: torch.device, args) -> list[tuple[str, bool, bool]]:
    """(precision, compile, channels_last) rows: on CUDA every precision x compile with channels-last (prepare's
    setting), and without it when eager and for the last precision compiled (a compile costs 5-20 s); on the CPU
    the encoder runs fp32 without channels-last whatever is asked."""
    if device.type != "cuda":
        return [("fp32", compiled, False) for compiled in args.compile]
    grid = []
    for precision in args.precisions:
        for compiled in args.compile:
            grid.append((precision, compiled, True))
            if not compiled or precision == args.precisions[-1]:
                grid.append((precision, compiled, False))
    return grid


# ---------------------------------------------------------------- pipeline


def pipeline_configs(case: str, device: torch.device, args) -> list[str]:
    """"precision[+compile]" of each prepare run: --pipeline, else fp32 (`mot prepare`'s default) and, for the
    chameleon case on CUDA, bf16 eager and compiled too."""
    if device.type != "cuda":
        return ["fp32+compile" if c.endswith("+compile") else "fp32" for c in dict.fromkeys(args.pipeline or ["fp32"])]
    if args.pipeline:
        return args.pipeline
    return ["fp32", "bf16", "bf16+compile"] if case == "chameleon" else ["fp32"]


def run_pipeline(data: Path, out: Path, setup: dict, device: torch.device, precision: str, compiled: bool,
                 workers: int, shard_size: int, args) -> dict:
    opts = setup["options"]
    if compiled:
        torch._dynamo.reset()
    stats = prepare(str(data), setup["loaders"], setup["vocab"], out, num_workers=workers, shard_size=shard_size,
                    max_doc_tokens=opts["max_doc_tokens"], show_progress=args.progress, resume=False,
                    image_resolution=opts["image_resolution"], sample_rate=opts["sample_rate"],
                    image_policy=opts["image_policy"], device=str(device), image_precision=precision,
                    compile=compiled, encode_batch_size=args.encode_batch_size, tokenizer_paths=setup["folders"],
                    source_options={"pair_orders": tuple(args.pair_orders)})
    profile, seconds = stats.profile, stats.seconds
    images = profile.get("counts", {}).get("images", 0)
    return {"precision": enc_precision(precision, device), "compile": compiled, "documents": stats.documents,
            "tokens": stats.tokens, "images": images, "audio": profile.get("counts", {}).get("audio", 0),
            "skipped": stats.skipped, "shards": stats.shards, "seconds": seconds,
            "documents_per_s": stats.documents / seconds, "tokens_per_s": stats.tokens / seconds,
            "images_per_s": images / seconds, "profile": profile, "device": stats.device}


STAGES = ("wait_decode", "wait_workers", "decode", "encode_submit", "encode_wait", "encode", "write")


def bound(run: dict, case: dict, device: torch.device, workers: int) -> str:
    """What bounds the run, from where the main process waited (profile), the GPU's busy share (images over the
    encoder-alone rate of the same settings) and the decode pool's rate."""
    p, seconds = run["profile"], run["seconds"]
    decode = case.get("decode")
    if device.type == "cuda":
        startup = min(p.get("wait_decode", 0.0), decode["pool_startup_s"]) if decode else 0.0
        shares = {"start-up (worker pool, tokenizers)": startup,
                  "waiting for decode workers": p.get("wait_decode", 0.0) - startup,
                  "GPU encode (submit + wait)": p.get("encode_submit", 0.0) + p.get("encode_wait", 0.0),
                  "assembling + writing shards": p.get("write", 0.0)}
        shares["the rest (dispatching parts, scans, manifest)"] = max(0.0, seconds - sum(shares.values()))
        split = ", ".join(f"{k} {100 * v / seconds:.0f}%" for k, v in shares.items())
        alone = next((e for e in case.get("encoder", []) if e["channels_last"]
                      and (e["precision"], e["compile"]) == (run["precision"], run["compile"])), None)
        gpu_s = run["images"] / alone["images_per_s"]["median"] if alone else None
        after = max(1e-9, seconds - startup)  # after the workers started
        pool = decode["pool_documents_per_s"]["median"] if decode else None
        what = [f"worker start-up ({startup:.0f}s of {seconds:.0f}s)"] if startup > 0.2 * seconds else []
        if gpu_s is not None and gpu_s >= 0.75 * after:
            what.append("GPU encode")
        elif pool and run["documents"] / after >= 0.75 * pool:
            what.append(f"decode workers (their pool alone: {pool:.0f} docs/s)")
        elif run["compile"]:
            what.append("compiling the encoder (inside the first batch's encode time) and the main process")
        else:
            what.append("the main process (one thread: dispatch, encoder launches, assembling, writing)"
                        + (f"; decode pool alone {pool:.0f} docs/s" if pool else ""))
        busy = (f"; GPU busy ~{100 * gpu_s / seconds:.0f}% of the run, ~{100 * gpu_s / after:.0f}% after start-up "
                f"(images / encoder-alone rate)" if gpu_s is not None else "")
        return f"{' + '.join(what)}{busy}\n      main process: {split}"
    if workers > 1:
        if decode and decode["pool_documents_per_s"]["median"] > 0:
            share = run["documents_per_s"] / decode["pool_documents_per_s"]["median"]
            return (f"workers (each reads, decodes and encodes its parts; shards written here): decode "
                    f"~{100 * share:.0f}% of their time (pipeline / decode-only docs/s), reading and encoding the rest")
        return "workers (each reads, decodes and encodes its parts; shards written here)"
    shares = {"decode": p.get("decode", 0.0), "encode (CPU)": p.get("encode", 0.0), "write": p.get("write", 0.0)}
    shares["other (reading tars, manifest)"] = max(0.0, seconds - sum(shares.values()))
    name, value = max(shares.items(), key=lambda kv: kv[1])
    return f"{name}: {100 * value / seconds:.0f}% of the run"


# ---------------------------------------------------------------- one case


def run_case(case: str, args, device: torch.device, work: Path, report: Report, speech: bool) -> dict:
    samples = args.samples if case == "demo" else args.chameleon_samples
    result: dict = {"case": case, "phases": {}}
    phase = time.perf_counter()

    def done(name: str) -> None:
        nonlocal phase
        result["phases"][name] = round(time.perf_counter() - phase, 1)
        report.progress(f"{case}: {name} done in {result['phases'][name]:.1f}s")
        phase = time.perf_counter()

    data = work / "data" / case
    result["data"] = generate(case, samples, data, args, report)
    result["data_dir"] = str(data)
    done("generate")

    setup = case_setup(case, work, args, speech)
    result["tokenizers"], result["options"] = setup["folders"], setup["options"]
    docs = list(open_documents(str(data), pair_orders=tuple(args.pair_orders)))
    result["documents"] = len(docs)
    workers = args.workers
    # whole rounds of 64-document pieces for the pool (a last, partial round would time the tail)
    single, pool = (2000, 64 * workers * 32) if case == "demo" else (100, 64 * workers * 3)
    if args.smoke:
        single, pool = 200, 200
    result["decode"] = time_decode(docs, setup, workers, args, (single, pool), report)
    done("decode")

    image_tok = load_tokenizer("image", setup["folders"]["image"])
    res = setup["resolution"]
    result["flops"] = count_flops(image_tok, res)
    flops = result["flops"]["encoder"] + result["flops"]["quantizer"]
    # On the CPU a call of about --cpu-call-gflop (ImageBatchEncoder splits at CPU_BATCH_PIXELS anyway)
    batch = (args.encode_batch_size or max(1, CUDA_BATCH_PIXELS // (res * res))) if device.type == "cuda" else \
        max(1, min(args.encode_batch_size or 64, CPU_BATCH_PIXELS // (res * res),
                   int(args.cpu_call_gflop * 1e9 // flops)))
    rows, grid = [], encoder_grid(device, args)
    if case == "demo" and not args.compile_demo and not all(compiled for _, compiled, _ in grid):
        grid = [row for row in grid if not row[1]]  # each compiled row costs a compile: on request
    for precision, compiled, channels_last in grid:
        row = time_encoder(image_tok, device, precision, compiled, channels_last, batch, res, args)
        row["tflops"] = row["images_per_s"]["median"] * flops / 1e12
        rows.append(row)
        report.progress(f"{case}: encoder {precision} compile={compiled} channels_last={channels_last}: "
                        f"{row['images_per_s']['median']:.3g} images/s (first call {row['first_call_s']}s)")
    result["encoder"] = rows
    del image_tok
    done("encoder")

    # With a GPU, workers decode pieces of 64 documents whatever the shard size (`mot prepare`'s 1000 here; a
    # piece never spans two shards, so a smaller one means smaller encoder batches). On the CPU a shard is what
    # one worker decodes, encodes and writes: the same number for every worker, up to 4 each, of 8+ documents.
    per_worker = max(1, min(4, len(docs) // (8 * max(1, workers))))
    shard_size = args.shard_size or (1000 if device.type == "cuda" else
                                     min(1000, math.ceil(len(docs) / (per_worker * max(1, workers)))))
    result["shard_size"] = shard_size
    out = work / "shards" / case
    runs, result["not_run"] = [], []
    configs = pipeline_configs(case, device, args)
    for r in range(args.pipeline_repeats):  # every setting once before any repeat
        for config in configs:
            precision, compiled = config.split("+")[0], config.endswith("+compile")
            last = next((run["seconds"] for run in runs if run["config"] == config), 0.0)
            if r and args.deadline and time.perf_counter() + 1.2 * last > args.deadline:
                result["not_run"].append(f"{config} repeat {r + 1}")
                report.progress(f"{case}: prepare {config} repeat {r + 1} skipped: it would end past --budget-s")
                continue
            run = run_pipeline(data, out, setup, device, precision, compiled, workers, shard_size, args)
            run["repeat"], run["config"] = r, config
            runs.append(run)
            report.progress(f"{case}: prepare {run['precision']} compile={compiled} run {r + 1}: "
                            f"{run['documents']} docs in {run['seconds']:.1f}s ({run['documents_per_s']:.0f} docs/s)")
    result["pipeline"] = runs
    for run in runs:
        run["bound"] = bound(run, result, device, workers)
    result["shards_dir"] = str(out)
    done("pipeline")
    return result


# ---------------------------------------------------------------- report


def print_case(r: dict, device: torch.device, workers: int, report: Report) -> None:
    d = r["data"]
    report()
    report(f"=== {r['case']}: {d['samples']} samples ({d['images']} images, {d['audio']} with audio, "
           f"{d['bytes'] / 2**20:.0f} MiB in {d['tars']} tars) -> {r['documents']} documents; {workers} workers, "
           f"{device}; images at {r['options']['image_resolution']} px ({r['options']['image_policy']})")
    dec = r["decode"]
    report(f"{'decode (CPU)':<52}{'images/s':>10}  {'min..max':<20}{'docs/s':>10}")
    report(f"{'  decode_image, 1 process (' + str(dec['single_images']) + ' images)':<52}"
           f"{fmt_rate(dec['single_images_per_s'])}")
    report(f"{'  x ' + str(workers) + ' workers (estimate)':<52}{fmt_rate(dec['estimate_images_per_s'])}")
    report(f"{'  DocumentDecoder.decode, pool of ' + str(workers) + ' (' + str(dec['pool_documents']) + ' docs)':<52}"
           f"{fmt_rate(dec['pool_images_per_s'])}{dec['pool_documents_per_s']['median']:>10.0f}")

    f = r["flops"]
    report()
    report(f"encoder alone: {f['encoder'] / 1e9:.1f} GFLOP/image encoder + quant_conv, {f['quantizer'] / 1e9:.2f} "
           f"GFLOP/image quantizer distances (fp32 matmul); % peak: of {PEAK_TFLOPS:.0f} TFLOP/s, the H200's dense "
           f"bf16 peak, for every row")
    report(f"{'precision':<10}{'compile':<8}{'ch-last':<8}{'batch':>6}{'images/s':>10}  {'min..max':<20}"
           f"{'TFLOP/s':>8}{'% peak':>8}{'first call s':>13}{'GiB':>6}")
    for e in r["encoder"]:
        pct = f"{100 * e['tflops'] / PEAK_TFLOPS:.1f}%" if device.type == "cuda" else "-"
        report(f"{e['precision']:<10}{'on' if e['compile'] else 'off':<8}{'on' if e['channels_last'] else 'off':<8}"
               f"{e['batch']:>6}{fmt_rate(e['images_per_s'])}{e['tflops']:>8.2f}{pct:>8}{e['first_call_s']:>13.1f}"
               f"{e['peak_gib']:>6.1f}")

    report()
    report(f"prepare end to end ({len(r['pipeline'])} runs, shard_size {r['shard_size']}; profile: seconds the main "
           f"process spent per stage)")
    report(f"{'precision':<10}{'compile':<8}{'docs':>8}{'seconds':>9}{'docs/s':>9}{'tokens/s':>11}{'images/s':>10}"
           f"{'x enc':>7}  {'wait_dec':>8}{'wait_wrk':>9}{'decode':>7}{'enc_sub':>8}{'enc_wait':>9}{'encode':>7}"
           f"{'write':>7}  skipped")
    alone = {(e["precision"], e["compile"]): e for e in r["encoder"] if e["channels_last"] or device.type != "cuda"}
    for run in r["pipeline"]:
        p = run["profile"]
        enc = alone.get((run["precision"], run["compile"]))
        ratio = f"{run['images_per_s'] / enc['images_per_s']['median']:.2f}" if enc else "-"
        stages = "".join(f"{p.get(s, 0.0):>{w}.1f}" for s, w in zip(STAGES, (8, 9, 7, 8, 9, 7, 7), strict=True))
        skipped = sum(run["skipped"].values())
        report(f"{run['precision']:<10}{'on' if run['compile'] else 'off':<8}{run['documents']:>8}"
               f"{run['seconds']:>9.1f}{num(run['documents_per_s']):>9}{num(run['tokens_per_s']):>11}"
               f"{num(run['images_per_s']):>10}{ratio:>7}  {stages}  {skipped}")
    for key in sorted({(run["precision"], run["compile"]) for run in r["pipeline"]}):
        runs = [run for run in r["pipeline"] if (run["precision"], run["compile"]) == key]
        summary = {k: spread([run[k] for run in runs]) for k in ("tokens_per_s", "documents_per_s", "images_per_s")}
        r.setdefault("pipeline_summary", {})[f"{key[0]}{'-compile' if key[1] else ''}"] = summary
        enc = alone.get(key)
        ratio = (f"; pipeline / encoder alone {summary['images_per_s']['median'] / enc['images_per_s']['median']:.2f}"
                 if enc else "")
        report(f"  {key[0]} compile {'on' if key[1] else 'off'}: tokens/s {fmt_rate(summary['tokens_per_s']).strip()}"
               f", docs/s {fmt_rate(summary['documents_per_s']).strip()}, images/s "
               f"{fmt_rate(summary['images_per_s']).strip()}{ratio}")
        startup = r["decode"]["pool_startup_s"]
        if device.type == "cuda" and all(run["profile"].get("wait_decode", 0.0) >= startup for run in runs):
            steady = statistics.median(run["images"] / (run["seconds"] - startup) for run in runs)
            ratio = f" = {steady / enc['images_per_s']['median']:.2f} x encoder alone" if enc else ""
            report(f"    without the worker start-up (~{startup:.1f}s, as the decode pool's): {steady:.1f} images/s"
                   f"{ratio}")
        report(f"    bound: {runs[-1]['bound']}")
        skipped = runs[-1]["skipped"]
        if skipped:
            report(f"    skipped: {skipped}")
    if r.get("not_run"):
        report(f"  not run (--budget-s): {', '.join(r['not_run'])}")
    report("  phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["phases"].items()))


def log_paths(tag: str) -> tuple[Path, Path]:
    folder = ROOT / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d")
    for suffix in ["", *"bcdefghijklmnopqrstuvwxyz"]:
        stem = f"prepare_{tag}_{date}{suffix}"
        if not (folder / f"{stem}.txt").exists() and not (folder / f"{stem}.json").exists():
            return folder / f"{stem}.txt", folder / f"{stem}.json"
    raise SystemExit(f"too many logs named prepare_{tag}_{date}* in {folder}")


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        return next((k for k in ("h200", "h100", "a100", "l40s", "a10g") if k in name), name.split()[-1])
    return f"cpu{os.cpu_count()}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "both"], default="both")
    parser.add_argument("--samples", type=int, default=0,
                        help="demo samples (2 documents each; default 50000 with a GPU, 2000 on the CPU)")
    parser.add_argument("--chameleon-samples", type=int, default=0,
                        help="chameleon samples (2 images to encode each; default 2000 with a GPU, 24 on the CPU)")
    parser.add_argument("--workers", type=int, default=0, help="decode processes (default as `mot prepare`)")
    parser.add_argument("--device", default="auto", help="where prepare encodes: auto, cpu, cuda, cuda:N")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS,
                        help="encoder-alone rows (CUDA; the CPU encodes in fp32)")
    parser.add_argument("--compile", nargs="+", default=None, choices=["off", "on"],
                        help="encoder-alone rows (default: off on with a GPU, off on the CPU)")
    parser.add_argument("--compile-demo", action="store_true", help="compiled encoder rows for the demo case too")
    parser.add_argument("--pipeline", nargs="+", default=None,
                        choices=[*PRECISIONS, *(f"{p}+compile" for p in PRECISIONS)],
                        help="prepare runs (CUDA): precision[+compile]; default fp32 (`mot prepare`'s default), and "
                             "for chameleon bf16 and bf16+compile too")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip further prepare repeats that would end past this many seconds from the start "
                             "(default 500 with a GPU, to fit a 10-minute command; 0: none)")
    parser.add_argument("--repeats", type=int, default=3, help="decode and encoder-alone timings")
    parser.add_argument("--pipeline-repeats", type=int, default=2)
    parser.add_argument("--encoder-seconds", type=float, default=1.0, help="aim of each encoder-alone timing")
    parser.add_argument("--encode-batch-size", type=int, default=None,
                        help="prepare's, and the encoder-alone batch (default: prepare's, by pixels)")
    parser.add_argument("--cpu-call-gflop", type=float, default=20.0,
                        help="on the CPU the encoder-alone batch is about this many GFLOP")
    parser.add_argument("--shard-size", type=int, default=0, help="default: about 4 chunks per worker, <= 1000")
    parser.add_argument("--pair-orders", nargs="+", default=["media-text", "text-media"],
                        choices=["media-text", "text-media"], help="documents per sample (TarDocuments)")
    parser.add_argument("--audio-fraction", type=float, default=0.1, help="demo samples with audio")
    parser.add_argument("--resolution", type=int, default=512, help="the chameleon VQGAN's resolution")
    parser.add_argument("--min-side", type=int, default=480, help="chameleon JPEG sides")
    parser.add_argument("--max-side", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="", help="generated tars, tokenizers and shards (default: a temp dir, "
                                                      "removed at the end); tars there are reused when the same")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--log", nargs="?", const="", default=None, metavar="TAG",
                        help="write the report and JSON to bench/results/prepare_<TAG>_<date>.{txt,json}")
    parser.add_argument("--progress", action="store_true", help="prepare's progress bars")
    parser.add_argument("--smoke", action="store_true", help="a few dozen samples on the CPU, in seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.resolution, args.min_side, args.max_side = "cpu", 64, 64, 128
        args.workers, args.repeats, args.pipeline_repeats = args.workers or 2, 1, 1
        args.encoder_seconds, args.audio_fraction, args.cpu_call_gflop = 0.2, max(args.audio_fraction, 0.25), 2.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    budget = args.budget_s if args.budget_s is not None else 500.0 if gpu else 0.0
    args.deadline = start + budget if budget else 0.0
    args.workers = args.workers or default_workers(str(device))
    args.threads = torch.get_num_threads()
    args.gen_workers = 1 if args.smoke else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    column = 2 if args.smoke else 0 if gpu else 1
    args.samples = args.samples or DEFAULT_SAMPLES["demo"][column]
    args.chameleon_samples = args.chameleon_samples or DEFAULT_SAMPLES["chameleon"][column]
    args.compile = [c == "on" for c in (args.compile or (["off", "on"] if gpu else ["off"]))]
    speech = importable("soundfile") and importable("torchaudio")
    if not speech:
        args.audio_fraction = 0.0
    report = Report()
    name = torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine()
    report(f"bench/prepare.py: {device} ({name}), {os.cpu_count()} CPUs, {args.workers} workers, torch "
           f"{torch.__version__}, python {platform.python_version()}")
    if hasattr(os, "getloadavg"):
        report(f"load average at the start: {os.getloadavg()[0]:.1f} (timings on a busy machine are low and noisy)")
    if not speech:
        report("note: soundfile or torchaudio missing: the demo case has no audio (and no speech tokenizer)")
    cases = CASES if args.case == "both" else (args.case,)
    results = []
    with contextlib.ExitStack() as stack:
        work = Path(args.out_dir) if args.out_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        for case in cases:
            results.append(run_case(case, args, device, work, report, speech))
            print_case(results[-1], device, args.workers, report)
    total = time.perf_counter() - start
    report()
    report(f"total {total:.1f}s" + (f"; load average at the end {os.getloadavg()[0]:.1f}"
                                     if hasattr(os, "getloadavg") else ""))
    out = {"args": {k: v for k, v in vars(args).items() if k != "deadline"}, "device": str(device), "device_name": name,
           "torch": torch.__version__, "cpus": os.cpu_count(), "peak_tflops_basis": PEAK_TFLOPS,
           "seconds": round(total, 1), "cases": {r["case"]: r for r in results}}
    text = json.dumps(out, indent=1, default=str)
    if args.json:
        Path(args.json).write_text(text)
    if args.log is not None:
        txt, js = log_paths(args.log or device_tag(device))
        txt.write_text("\n".join(report.lines) + "\n")
        js.write_text(text)
        print(f"wrote {txt} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
