"""Generation benchmark: decode tokens/s at batch 1 and 8, and one guided 1024-token image, eager and compiled.

    python bench/generate.py [--recipe recipes/paper/chameleon_1_5b.toml] [--tokens 256] [--json OUT.json]
    python bench/generate.py --model.untie=[]           # the dense baseline of the same recipe
    python bench/generate.py --smoke                    # tiny config on the CPU, a few seconds: checks the script

Random weights in bf16 on one CUDA GPU (the numbers do not depend on what the weights are, only on
how many tokens are generated, and random weights never stop early: sampling runs to max tokens).
"compiled" is the single-token decode step under torch.compile(mode="reduce-overhead"): static cache
shapes, so inductor's CUDA graphs replay the whole step; the prefill stays eager. The image row is
text prompt + <boi>, then exactly `--image-tokens` codes and <eoi> under classifier-free guidance
(batch 2: the conditional and the unconditional stream). Issue 5's goal: 1024-token image < 5 s on an H100.
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


def timed_generation(model, prompts, config: GenerationConfig, compiled: bool, warmup_tokens: int) -> dict:
    """One warm-up generation (compiles and records the graphs on the same cache), then one timed one."""
    rows = len(prompts) * (2 if config.guided else 1)
    decoder = CachedDecoder(model, rows, len(prompts[0]) + config.max_new_tokens, compile=compiled)
    warm = dataclasses.replace(config, max_new_tokens=warmup_tokens)
    if config.image_tokens and prompts[0][-1] == model.vocab.special_id("<boi>"):
        warm = dataclasses.replace(warm, max_new_tokens=config.max_new_tokens)  # the span must fit the budget
    start = time.perf_counter()
    generate(model, prompts, warm, decoder)
    warmup_s = time.perf_counter() - start
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    start = time.perf_counter()
    results = generate(model, prompts, config, decoder)
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(r.tokens) for r in results)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "ms_per_step": 1e3 * seconds / max(len(r.tokens) for r in results), "warmup_s": warmup_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per sample in the tokens/s rows")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--image-tokens", type=int, default=1024)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU (eager), to check the script")
    parser.add_argument("--json", default="")
    args, overrides = parser.parse_known_args()

    if args.smoke:
        cfg, device, dtype = smoke_config(), torch.device("cpu"), torch.float32
        args.tokens, args.image_tokens, args.prompt_len = 16, 16, 8
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/generate.py needs a CUDA GPU (or --smoke)")
        cfg, device, dtype = load_config(args.recipe, overrides).model, torch.device("cuda"), torch.bfloat16
    compile_modes = [False] if args.smoke or args.no_compile else [False, True]
    model = build_model(cfg, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: d={cfg.dim} L={cfg.n_layers} H={cfg.n_heads} untie={cfg.untie} "
          f"vocab={model.vocab.size} params={n_params / 1e9:.2f}B on {device} {dtype}")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")

    rows = []
    for compiled in compile_modes:
        mode = "compiled" if compiled else "eager"
        for batch in [int(b) for b in args.batches.split(",")]:
            config = GenerationConfig(max_new_tokens=args.tokens, temperature=1.0, seed=0)
            prompts = [text_prompt(model, args.prompt_len, image=False)] * batch
            r = timed_generation(model, prompts, config, compiled, warmup_tokens=8)
            rows.append({"run": f"text, batch {batch}", "mode": mode, **r})
            print(rows[-1])
        if "image" in [m.name for m in cfg.modalities]:
            config = GenerationConfig(max_new_tokens=args.image_tokens + 1, temperature=1.0, seed=0,
                                      image_tokens=args.image_tokens, guidance_scale=args.guidance_scale)
            prompts = [text_prompt(model, args.prompt_len, image=True)]
            r = timed_generation(model, prompts, config, compiled, warmup_tokens=8)
            rows.append({"run": f"{args.image_tokens}-token image, guidance {args.guidance_scale} (2 streams)",
                         "mode": mode, **r})
            print(rows[-1])

    header = f"{'run':<44} {'mode':<9} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'ms/step':>8} {'warm-up s':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['run']:<44} {r['mode']:<9} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['ms_per_step']:>8.2f} {r['warmup_s']:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": dataclasses.asdict(cfg), "device": str(device),
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
