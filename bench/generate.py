"""Generation benchmark: decode tokens/s, ms per step beside the bandwidth floor, guided images/s for N samples.

    python bench/generate.py [--recipe recipes/paper/chameleon_1_5b.toml] [--modes eager,graph,compiled]
    python bench/generate.py --images 1,8,32 --modes graph          # batched guided images, CUDA graphs
    python bench/generate.py --profile                              # where an eager step's host time goes
    python bench/generate.py --model.untie=[]                       # the dense baseline of the same recipe
    python bench/generate.py --smoke                                # tiny config on the CPU: checks the script

Random weights in bf16 on one CUDA GPU (the numbers depend on how many tokens are generated, not on the
weights; random weights never stop early, so sampling runs to max tokens). Modes of `CachedDecoder`:

- eager: the cached forward, one queued host-to-GPU copy per step, one-tower steps without routing ops;
- graph: the fixed-shape step captured once as a CUDA graph without inductor, replayed every step;
- compiled: the fixed-shape step under torch.compile(mode="reduce-overhead"): inductor's kernels + CUDA graphs.

The prefill and diffusion blocks stay eager in every mode. Every row is timed on a second generation of the
same shape, after a warm-up generation on the same decoder (which captures or compiles: its time is reported
apart as warm-up). The image rows: text prompt + <boi>, then exactly `--image-tokens` codes and <eoi> under
classifier-free guidance (2 streams per sample). Floor: the step's bytes (the weights a step reads, its tower's
slices and the shared head, plus the KV cache at the mean length) over the card's memory bandwidth
(`--bandwidth-tbs`, the H200's 4.8 TB/s by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mot.config import ModalityConfig, ModelConfig, load_config  # noqa: E402
from mot.generate.decoder import CachedDecoder  # noqa: E402
from mot.generate.loop import GenerationConfig, generate  # noqa: E402
from mot.model import MoTTransformer  # noqa: E402

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "paper" / "chameleon_1_5b.toml"


def smoke_config() -> ModelConfig:
    return ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=512,
                       modalities=[ModalityConfig("text", 256), ModalityConfig("image", 256)])


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> MoTTransformer:
    with torch.device(device):  # initialise on the GPU: a 2.7B-parameter init on the host takes minutes
        model = MoTTransformer(cfg)
    return model.to(dtype).eval()


def text_prompt(model: MoTTransformer, length: int, image: bool) -> list[int]:
    v = model.vocab
    text = torch.randint(v["text"].start, v["text"].stop, (length - 1,), generator=torch.Generator().manual_seed(0))
    return [v.special_id("<bod>"), *text.tolist()] + ([v.special_id("<boi>")] if image else [])


def step_bytes(model: MoTTransformer, tower: int, rows: int, mean_length: float) -> float:
    """Bytes one decoding step must read: one tower's slice of every untied parameter, every shared parameter
    but the embedding (only its rows are read), and the keys and values of `rows` rows of `mean_length` slots."""
    weights = 0
    for name, p in model.named_parameters():
        if name == "embed.weight" and not model.cfg.tie_embeddings:
            continue
        per_tower = "blocks." in name or name.startswith("final_norm")
        weights += (p[tower] if per_tower and p.shape[0] > 1 else p).numel() * p.element_size()
    cfg, element = model.cfg, model.embed.weight.element_size()
    cache = 2 * cfg.n_layers * rows * mean_length * cfg.kv_heads * cfg.head_dim * element
    return weights + cache


def timed_generation(model, prompts, config: GenerationConfig, mode: str, warmup_tokens: int) -> dict:
    """One warm-up generation (captures or compiles the graphs on the same cache), then one timed one."""
    rows = len(prompts) * (2 if config.guided else 1)
    decoder = CachedDecoder(model, rows, len(prompts[0]) + config.max_new_tokens, compile=mode == "compiled",
                            cuda_graph=mode == "graph")
    warm = dataclasses.replace(config, max_new_tokens=warmup_tokens)
    if config.image_tokens and prompts[0][-1] == model.vocab.special_id("<boi>"):
        warm = dataclasses.replace(warm, max_new_tokens=config.max_new_tokens)  # the span must fit the budget
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    start = time.perf_counter()
    generate(model, prompts, warm, decoder)
    sync()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    results = generate(model, prompts, config, decoder)
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(r.tokens) for r in results)
    steps = max(len(r.tokens) for r in results)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "steps": steps,
            "ms_per_step": 1e3 * seconds / steps, "samples_per_s": len(prompts) / seconds, "warmup_s": warmup_s,
            "rows": rows, "mean_length": len(prompts[0]) + steps / 2}


def profile_eager(model, prompt: list[int], steps: int) -> None:
    """Top host-side ops of eager decoding steps (torch.profiler), and the syncs among them."""
    from torch.profiler import ProfilerActivity, profile

    config = GenerationConfig(max_new_tokens=steps, temperature=1.0, seed=0)
    decoder = CachedDecoder(model, 1, len(prompt) + steps)
    generate(model, [prompt], config, decoder)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        generate(model, [prompt], config, decoder)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    syncs = {e.key: e.count for e in prof.key_averages() if "Synchronize" in e.key or "Memcpy" in e.key}
    print(f"per step over {steps} steps: " + ", ".join(f"{k} {v / steps:.2f}" for k, v in syncs.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per sample in the tokens/s rows")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--image-tokens", type=int, default=1024)
    parser.add_argument("--images", default="1", help="samples per guided-image row, comma-separated")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--modes", default="eager,graph,compiled")
    parser.add_argument("--eager-image-tokens", type=int, default=0,
                        help="codes per image in the eager image rows (0: --image-tokens); eager is slow")
    parser.add_argument("--bandwidth-tbs", type=float, default=4.8, help="memory bandwidth for the floor, TB/s")
    parser.add_argument("--profile", action="store_true", help="profile eager text steps and stop")
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU (eager), to check the script")
    parser.add_argument("--json", default="")
    args, overrides = parser.parse_known_args()

    if args.smoke:
        cfg, device, dtype = smoke_config(), torch.device("cpu"), torch.float32
        args.tokens, args.image_tokens, args.prompt_len, args.images = 16, 16, 8, "1,2"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/generate.py needs a CUDA GPU (or --smoke)")
        cfg, device, dtype = load_config(args.recipe, overrides).model, torch.device("cuda"), torch.bfloat16
    modes = ["eager"] if args.smoke else args.modes.split(",")
    model = build_model(cfg, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: d={cfg.dim} L={cfg.n_layers} H={cfg.n_heads} untie={cfg.untie} "
          f"vocab={model.vocab.size} params={n_params / 1e9:.2f}B on {device} {dtype}")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.profile:
        profile_eager(model, text_prompt(model, args.prompt_len, image=False), 32)
        return
    names = [m.name for m in cfg.modalities]
    bandwidth = args.bandwidth_tbs * 1e12

    rows = []
    for mode in modes:
        for batch in [int(b) for b in args.batches.split(",")]:
            config = GenerationConfig(max_new_tokens=args.tokens, temperature=1.0, seed=0)
            prompts = [text_prompt(model, args.prompt_len, image=False)] * batch
            r = timed_generation(model, prompts, config, mode, warmup_tokens=8)
            floor = step_bytes(model, 0, r["rows"], r["mean_length"]) / bandwidth
            rows.append({"run": f"text, batch {batch}", "mode": mode, "floor_ms": 1e3 * floor, **r})
            print(rows[-1])
        if "image" not in names:
            continue
        image_tokens = args.eager_image_tokens or args.image_tokens if mode == "eager" else args.image_tokens
        for samples in [int(n) for n in args.images.split(",")]:
            config = GenerationConfig(max_new_tokens=image_tokens + 1, temperature=1.0, seed=0,
                                      image_tokens=image_tokens, guidance_scale=args.guidance_scale)
            prompts = [text_prompt(model, args.prompt_len, image=True)] * samples
            r = timed_generation(model, prompts, config, mode, warmup_tokens=8)
            floor = step_bytes(model, names.index("image"), r["rows"], r["mean_length"]) / bandwidth
            rows.append({"run": f"{image_tokens}-token image x{samples}, guidance {args.guidance_scale}",
                         "mode": mode, "floor_ms": 1e3 * floor, **r})
            print(rows[-1])

    header = (f"{'run':<40} {'mode':<9} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'ms/step':>8} "
              f"{'floor ms':>8} {'samples/s':>9} {'warm-up s':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['run']:<40} {r['mode']:<9} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['ms_per_step']:>8.2f} {r['floor_ms']:>8.3f} {r['samples_per_s']:>9.3f} {r['warmup_s']:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": dataclasses.asdict(cfg), "device": str(device),
                                               "bandwidth_tbs": args.bandwidth_tbs, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
