"""A Chameleon-shape model through mot end to end (issue 21): import -> upcycle -> train with the text tower frozen
(LMFusion) -> generate, with the memory and the rates each step took.

    python3 bench/chameleon_pipeline.py --log             # one H200: a ~1.1B dense Chameleon (1.9B as MoT)
    python3 bench/chameleon_pipeline.py --smoke           # CPU, about a minute: tiny shapes, checks the script

Nothing can be downloaded, so the "released" model is made here with random weights in Chameleon's layout:

    hf/config.json            Chameleon's config: vocabulary_map with 8,192 IMGIMG tokens among 65,536 ids,
                              per-head q/k LayerNorms, the VQVAE's vq_config (512 px -> 32 x 32 codes)
    hf/model.safetensors      the language model in bf16 (Chameleon's names) and the VQVAE in fp32
    hf/tokenizer.json         a byte-level BPE of Chameleon's size (the 256 byte symbols among filler tokens)
    vqgan.safetensors, .yaml  the taming VQGAN of the same encoder, with a decoder (what Chameleon ships)

Then, as a user would: `import_hf` (with the VQGAN), `upcycle` into text and image towers, synthetic
webdataset tars (JPEGs of varied sizes + captions, mot/data/synthetic_docs.py) prepared on the GPU with the
imported tokenizers, `train` from the upcycled weights with `train.freeze = ["tower:text", "embed:text"]`
(bf16, master weights on one GPU), a check that the frozen text tower is bit-identical afterwards, and a
guided image and some text generated from the trained run (eager decoding). Every step's wall time, peak GPU
memory (torch.cuda.max_memory_allocated, reset per step) and its rate are printed as a table; --log writes it
with the JSON to bench/results/chameleon_pipeline_<tag>_<date>.{md,json} and the generation page to
docs/results/chameleon_pipeline/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mot.config import DataConfig, RunConfig, TrainConfig  # noqa: E402
from mot.flops import param_counts  # noqa: E402
from mot.generate.page import generate_page  # noqa: E402
from mot.generate.session import GenerationRequest, Session  # noqa: E402
from mot.grow import read_source, upcycle, write_derived  # noqa: E402
from mot.interop.chameleon import import_hf, model_config_from_hf, state_to_hf  # noqa: E402
from mot.interop.chameleon_vocab import ChameleonVocab, image_token_name  # noqa: E402
from mot.model import MoTTransformer  # noqa: E402
from mot.runs import load_for_inference, load_model_state, resolve_checkpoint  # noqa: E402
from mot.tokenize.image import ImageTokenizer, VQGANConfig, load_vqgan_config  # noqa: E402
from mot.train.trainer import train  # noqa: E402

SIZES = {
    # hidden, layers, heads, kv heads, ffn, vocabulary, position limit; the VQGAN; the run's sequence and batch
    "1b": dict(hidden=2048, layers=16, heads=16, kv_heads=16, ffn=5632, vocab=65536, max_positions=4096,
               vqgan="chameleon", samples=1500, seq_len=4096, batch=8, micro=2, steps=40, min_side=480,
               max_side=800, eval_fraction=0.02, workers=8, log_every=5),
    "smoke": dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=512, max_positions=512,
                  vqgan="smoke", samples=12, seq_len=256, batch=2, micro=0, steps=3, min_side=48, max_side=96,
                  eval_fraction=0.3, workers=1, log_every=1),
}
SMOKE_VQGAN = VQGANConfig(resolution=64, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=8,
                          embed_dim=8, n_embed=64)
FREEZE = ["tower:text", "embed:text"]  # LMFusion: the pretrained text model stays as it is


def billions(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def vqgan_config(name: str) -> VQGANConfig:
    return SMOKE_VQGAN if name == "smoke" else load_vqgan_config(ROOT / "tokenizers" / "vqgan_chameleon.toml")


def vocabulary_map(codes: int) -> dict[str, int]:
    """Chameleon's layout: <s> <pad> </s> <unk>, the image codes, <eoss> <racm3:break> <image>, then BPE."""
    names = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    names.update({image_token_name(c): 4 + c for c in range(codes)})
    names.update({"<eoss>": 4 + codes, "<racm3:break>": 5 + codes, "<image>": 6 + codes})
    return names


def byte_level_tokenizer(vocab_map: dict[str, int], size: int):
    """A tokenizer.json of `size` ids: the map's tokens at their ids, the 256 byte-level symbols after them,
    filler tokens to the end (no merges: text encodes byte by byte)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = dict(vocab_map)
    taken = set(vocab.values())
    free = (i for i in range(size) if i not in taken)
    for symbol in pre_tokenizers.ByteLevel.alphabet():
        vocab[symbol] = next(free)
    for i in free:
        vocab[f"<filler{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def make_release(folder: Path, size: dict, seed: int = 0) -> dict:
    """The "released" Chameleon: hf/ (config, weights, tokenizer) and the taming VQGAN beside it."""
    vq = vqgan_config(size["vqgan"])
    vm = vocabulary_map(vq.n_embed)
    config = {
        "model_type": "chameleon", "architectures": ["ChameleonForConditionalGeneration"],
        "vocab_size": size["vocab"], "hidden_size": size["hidden"], "intermediate_size": size["ffn"],
        "num_hidden_layers": size["layers"], "num_attention_heads": size["heads"],
        "num_key_value_heads": size["kv_heads"], "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "max_position_embeddings": size["max_positions"], "initializer_range": 0.02, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "attention_bias": False,
        "mlp_bias": False, "swin_norm": False, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
        "vocabulary_map": vm,
        "vq_config": {"embed_dim": vq.embed_dim, "num_embeddings": vq.n_embed, "double_latent": False,
                      "latent_channels": vq.z_channels, "resolution": vq.resolution, "in_channels": 3,
                      "base_channels": vq.ch, "channel_multiplier": vq.ch_mult, "num_res_blocks": vq.num_res_blocks,
                      "attn_resolutions": vq.attn_resolutions, "dropout": 0.0, "attn_type": "vanilla"},
    }
    vocab = ChameleonVocab.from_vocabulary_map(vm, size["vocab"])
    model_cfg = model_config_from_hf(config, vocab)
    torch.manual_seed(seed)
    model = MoTTransformer(model_cfg)
    with torch.no_grad():  # q/k norms start at ones and zeros; make them differ, as trained ones do
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf = {k: v.to(torch.bfloat16) for k, v in state_to_hf(model.state_dict(), model_cfg,
                                                            vocab.mot_to_hf(model.vocab), size["vocab"]).items()}
    del model
    vqgan = ImageTokenizer(vq)  # random, with a decoder: the taming checkpoint
    vq_state = {k: v.contiguous() for k, v in vqgan.state_dict().items()}
    hf.update({f"model.vqmodel.{k}": v for k, v in vq_state.items() if not k.startswith("decoder.")})
    (folder / "hf").mkdir(parents=True, exist_ok=True)
    save_file(hf, str(folder / "hf" / "model.safetensors"), metadata={"format": "pt"})
    (folder / "hf" / "config.json").write_text(json.dumps(config, indent=1))
    byte_level_tokenizer(vm, size["vocab"]).save(str(folder / "hf" / "tokenizer.json"))
    save_file(vq_state, str(folder / "vqgan.safetensors"))
    ddconfig = {k: getattr(vq, k) for k in ("double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch",
                                            "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")}
    (folder / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": vq.embed_dim, "n_embed": vq.n_embed, "ddconfig": ddconfig}}}))
    return {"params_dense": param_counts(model_cfg)[0], "image_codes": vq.n_embed,
            "codes_per_image": (vq.resolution // vq.downsample_factor) ** 2, "resolution": vq.resolution}


class Steps:
    """Wall time, peak GPU memory and a note per step, printed as they finish."""

    def __init__(self):
        self.rows: list[dict] = []
        self.cuda = torch.cuda.is_available()

    def run(self, name: str, fn, rate=None):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
        row = {"step": name, "seconds": round(seconds, 2), "peak_gib": None if peak is None else round(peak, 2),
               "rate": rate(result, seconds) if rate else ""}
        self.rows.append(row)
        print(f"  {name:<28} {seconds:8.1f} s   peak {'-' if peak is None else f'{peak:.1f} GiB':>10}   "
              f"{row['rate']}", flush=True)
        return result

    def table(self) -> str:
        lines = ["| step | wall s | peak GPU memory | rate |", "|---|---|---|---|"]
        for r in self.rows:
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} GiB"
            lines.append(f"| {r['step']} | {r['seconds']:.1f} | {peak} | {r['rate']} |")
        return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--smoke", action="store_true", help="--size smoke on the CPU (checks the script)")
    parser.add_argument("--steps", type=int, default=0, help="training steps (default: the size's)")
    parser.add_argument("--out-dir", default="", help="work folder (default: a temporary one)")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--log", nargs="?", const="auto", default="",
                        help="write bench/results/chameleon_pipeline_<TAG>_<date>.{md,json} and the page")
    args = parser.parse_args()
    name = "smoke" if args.smoke else args.size
    size = dict(SIZES[name], steps=args.steps or SIZES[name]["steps"])
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    work = Path(args.out_dir or tempfile.mkdtemp(prefix="chameleon_pipeline_"))
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps()
    print(f"chameleon pipeline, size {name}, on {device}, in {work}", flush=True)

    release = steps.run("make the release (random)", lambda: make_release(work, size),
                        lambda r, s: f"{billions(r['params_dense'])} parameters")
    steps.run("import-hf (+ --vqgan)", lambda: import_hf(work / "hf", work / "dense",
                                                          vqgan=(work / "vqgan.safetensors", work / "vqgan.yaml")))

    def do_upcycle():
        source = read_source(work / "dense")
        cfg, state, _ = upcycle(source)
        write_derived(work / "mot", source, cfg, state, {}, "upcycle", {})
        return cfg

    mot_cfg = steps.run("upcycle (text, image towers)", do_upcycle,
                        lambda c, s: f"{billions(param_counts(c.model)[0])} parameters")

    from mot.data.synthetic_docs import write_shards

    steps.run("synthetic tars", lambda: write_shards("chameleon", work / "tars", size["samples"],
                                                     per_tar=max(1, size["samples"] // 8), workers=size["workers"],
                                                     min_side=size["min_side"], max_side=size["max_side"]),
              lambda r, s: f"{sum(t['samples'] for t in r)} samples")
    run = RunConfig(
        name="lmfusion", model=dataclasses.replace(mot_cfg.model),
        train=TrainConfig(seq_len=size["seq_len"], batch_size=size["batch"], micro_batch_size=size["micro"],
                          steps=size["steps"], lr=1e-4, warmup_steps=min(10, size["steps"] - 1),
                          log_every=size["log_every"], eval_every=0, eval_batches=1, checkpoint_every=0,
                          keep_checkpoints=1, tensorboard=False, out_dir=str(work), freeze=FREEZE),
        data=DataConfig(shards=str(work / "shards"), documents=str(work / "tars"),
                        tokenizers=str(work / "mot" / "tokenizers"), prepare_workers=size["workers"],
                        eval_fraction=size["eval_fraction"]))
    from mot.train.data import ensure_prepared

    prepared = steps.run("prepare (imported tokenizers)", lambda: ensure_prepared(run, "bench"),
                         lambda r, s: f"{json.loads((r / 'manifest.json').read_text())['tokens'] / s:,.0f} tokens/s")
    tokens = json.loads((prepared / "manifest.json").read_text())["tokens"]
    result = steps.run("train (text tower frozen)", lambda: train(run, "bench", init_from=str(work / "mot"),
                                                                   progress=False),
                       lambda r, s: f"{size['steps'] * size['batch'] * size['seq_len'] / s:,.0f} tokens/s "
                                    "(with startup)")
    start, end = load_model_state(resolve_checkpoint(work / "mot")), load_model_state(result.checkpoint)
    frozen = [k for k, v in start.items() if k.startswith("blocks.") and v.shape[0] == 2]
    text_unchanged = all(torch.equal(end[k][0], start[k][0]) for k in frozen)
    image_moved = any(not torch.equal(end[k][1], start[k][1]) for k in frozen)
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in log if r.get("kind") == "train"]
    steady = sorted(r["tokens_per_s"] for r in train_rows[1:]) or [float("nan")]
    mfu = sorted(r["mfu"] for r in train_rows[1:] if "mfu" in r)
    steps.rows[-1]["rate"] += (f"; {steady[len(steady) // 2]:,.0f} tokens/s median of the log windows after the "
                               f"first" + (f", the trainer's MFU {mfu[len(mfu) // 2]:.1%}" if mfu else ""))

    model, _, tokenizer_folder = load_for_inference(result.run_dir)
    session = Session(model, tokenizer_folder, device=device)
    pages = work / "pages"
    image_request = GenerationRequest(prompt="a red house by a lake", then="image", guidance_scale=3.0,
                                      max_tokens=release["codes_per_image"] + 2, samples=1)
    steps.run("generate: guided image", lambda: generate_page(session, image_request, pages / "image.html", "bench"),
              lambda r, s: f"{release['codes_per_image']} codes, {release['codes_per_image'] / s:.1f} tokens/s")
    text_request = GenerationRequest(prompt="Once upon a time", max_tokens=64, samples=4)
    steps.run("generate: text, 4 samples", lambda: generate_page(session, text_request, pages / "text.html", "bench"),
              lambda r, s: f"{4 * 64 / s:.1f} tokens/s (at most)")

    results = {
        "size": name, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "date": date.today().isoformat(), "settings": size, "release": release,
        "prepared_tokens": tokens, "steps": steps.rows, "freeze": FREEZE,
        "text_tower_unchanged": text_unchanged, "image_tower_trained": image_moved,
        "train_log": train_rows, "pages": [str(p) for p in sorted(pages.glob("*.html"))],
    }
    report = (f"Chameleon-shape pipeline, size {name} ({billions(release['params_dense'])} dense, "
              f"{billions(param_counts(mot_cfg.model)[0])} as MoT), {results['device']}, torch {torch.__version__}; "
              f"train: {size['steps']} steps of {size['batch']} x {size['seq_len']} tokens, freeze {FREEZE}\n\n"
              + steps.table()
              + f"\n\nfrozen text tower bit-identical after training: {text_unchanged}; image tower trained: "
                f"{image_moved}\nlast training rows: {train_rows[-2:]}\n")
    print("\n" + report)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.log:
        tag = (args.log if args.log != "auto" else (results["device"].split()[-1].lower() if device == "cuda"
                                                     else "cpu"))
        stem = ROOT / "bench" / "results" / f"chameleon_pipeline_{tag}_{date.today().isoformat()}"
        stem.with_suffix(".md").write_text(report)
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
        docs = ROOT / "docs" / "results" / "chameleon_pipeline"
        docs.mkdir(parents=True, exist_ok=True)
        for page in pages.iterdir():
            (docs / page.name).write_bytes(page.read_bytes())
        print(f"written: {stem}.md, {stem}.json, {docs}/")
    return 0 if text_unchanged and image_moved else 1


if __name__ == "__main__":
    sys.exit(main())
