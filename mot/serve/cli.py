"""`mot serve`: a checkpoint behind a local web page (mot/serve/app.py).

    mot serve --ckpt runs/demo [--host 127.0.0.1] [--port 8000] [--device auto] [--precision auto]
"""

from __future__ import annotations

import argparse
import sys

from mot.config import ConfigError


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> int:
    import uvicorn

    from mot.generate.prompt import GenerationError
    from mot.generate.session import Session
    from mot.runs import load_for_inference
    from mot.serve.app import create_app

    if overrides:
        raise ConfigError(f"mot serve: unexpected arguments {overrides}")
    model, _, tokenizer_folder = load_for_inference(args.ckpt)
    try:
        session = Session(model, tokenizer_folder, args.device, args.precision, args.decoding)
    except GenerationError as err:
        raise ConfigError(f"mot serve: {err}") from None
    print(f"mot serve: {args.ckpt} on {session.device}; open http://{args.host}:{args.port}", file=sys.stderr)
    uvicorn.run(create_app(session, str(args.ckpt)), host=args.host, port=args.port, log_level="warning")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a local web page that streams a checkpoint's text, images and speech")
    p.add_argument("--ckpt", required=True, help="a checkpoint folder (step-*) or a run folder (its latest)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on a GPU")
    p.add_argument("--decoding", choices=["auto", "eager", "graph", "compile"], default="auto",
                   help="decode steps: auto = CUDA graphs on a GPU (mot generate --help), eager on the CPU")
    p.set_defaults(func=cmd_serve)
