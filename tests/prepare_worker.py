"""One process of a multi-process `prepare`, for tests/test_prepare_distributed.py (run as a file, one per rank,
with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set as torchrun sets them):

    python tests/prepare_worker.py CORPUS OUT MARKER [--workers N]

Rank 0 prints the stats as one `STATS {...}` line. The settings live here so that the test's in-process reference
run uses the same ones."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

STATS = "STATS "
SHARD_SIZE, MAX_DOC_TOKENS = 3, 200
WATCHDOG_S = 120  # a rank left waiting on a dead peer dies instead of outliving the test


def tokenizers(marker: str) -> dict:
    from tests.fakes import FakeImage, FakeSpeech, KillingText

    return {"text": KillingText(marker), "image": FakeImage(), "speech": FakeSpeech()}


def run(corpus: str, out: str, marker: str, workers: int = 0):
    from mot.data.prepare import prepare
    from mot.vocab import UnifiedVocab
    from tests.conftest import tiny_config

    return prepare(corpus, tokenizers(marker), UnifiedVocab(tiny_config()), out, num_workers=workers,
                   shard_size=SHARD_SIZE, max_doc_tokens=MAX_DOC_TOKENS, show_progress=False, device="cpu")


def main() -> None:
    signal.alarm(WATCHDOG_S)  # SIGALRM's default action ends the process, also inside a blocking collective
    parser = argparse.ArgumentParser()
    parser.add_argument("corpus")
    parser.add_argument("out")
    parser.add_argument("marker")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    stats = run(args.corpus, args.out, args.marker, args.workers)
    if int(os.environ.get("RANK", "0")) == 0:
        print(STATS + json.dumps(stats.as_dict()), flush=True)
    sys.stderr.flush()
    # gloo's threads can abort the interpreter's teardown (see tests/test_sharding.py); the work is done.
    os._exit(0)


if __name__ == "__main__":
    main()
