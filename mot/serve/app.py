"""The `mot serve` web app (FastAPI): one page, and one endpoint that streams a generation as it happens.

    GET  /               the page (mot/serve/index.html)
    GET  /api/info       the checkpoint's modalities, limits and defaults
    POST /api/generate   the settings as JSON -> newline-delimited JSON events, in order:
        {"type": "queued", "ahead": n}      requests before this one (one generation runs at a time, in order)
        {"type": "start"}
        {"type": "text", "sample": i, "segment": k, "text": ...}      segment k's whole text so far
        {"type": "image" | "audio", "sample": i, "segment": k, "src": "data:..."}   when the span closes
        {"type": "done", "tokens": n, "seconds": s}  or  {"type": "error", "message": ...}

A request that cannot be served (an empty prompt, an unknown modality, too many tokens, a setting that is
not a number) is answered with HTTP 400 and {"error": message} before any work, and the server goes on; a
full queue with HTTP 503. A client that disconnects cancels its generation at the next token.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from mot.generate.prompt import GenerationError
from mot.generate.session import GenerationRequest, Session
from mot.serve.stream import SpanEvents

PAGE = Path(__file__).with_name("index.html")
# The page's choice of what comes next -> GenerationRequest.then
NEXT = {"text": "auto", "image": "image", "speech": "speech"}
NUMBERS = {"guidance_scale": float, "temperature": float, "samples": int, "seed": int, "max_tokens": int}
MAX_SAMPLES = 8
MAX_WAITING = 16  # requests queued or running; more are turned away (HTTP 503) rather than left to wait


class TurnQueue:
    """First come, first served: one generation at a time; a ticket tells how many are ahead of it."""

    def __init__(self):
        self._cond = threading.Condition()
        self._issued = self._serving = 0

    def ticket(self) -> int:
        with self._cond:
            self._issued += 1
            return self._issued - 1

    def ahead(self, ticket: int) -> int:
        with self._cond:
            return ticket - self._serving

    def wait(self, ticket: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._serving == ticket)

    def waiting(self) -> int:
        """Tickets issued and not yet served (the running one included)."""
        with self._cond:
            return self._issued - self._serving

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


def _number(body: dict, key: str, kind: type) -> Any:
    value = body[key]
    label = key.replace("_", " ")
    try:
        number = kind(value) if kind is float else int(str(value).strip())
    except (TypeError, ValueError):
        raise GenerationError(f"{label} must be {'a number' if kind is float else 'a whole number'}, "
                              f"got {value!r}") from None
    if kind is float and number != number:  # NaN
        raise GenerationError(f"{label} must be a number, got {value!r}")
    return number


def parse_request(body: Any, session: Session) -> GenerationRequest:
    """The page's settings as a checked GenerationRequest; a GenerationError names the bad one."""
    if not isinstance(body, dict):
        raise GenerationError("expected a JSON object of settings")
    unknown = sorted(set(body) - {"prompt", "next", *NUMBERS})
    if unknown:
        raise GenerationError(f"unknown settings {unknown}")
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str) or not prompt.strip():
        raise GenerationError("the prompt is empty: type a caption or some text")
    choice = body.get("next", "text")
    allowed = [m for m in NEXT if m == "text" or m in session.modalities]
    if choice not in allowed:
        raise GenerationError(f"unknown modality {choice!r}: choose one of {allowed}")
    numbers = {key: _number(body, key, kind) for key, kind in NUMBERS.items() if key in body}
    if not 0 <= numbers.get("seed", 0) < 2**63:
        raise GenerationError(f"seed must be between 0 and 2**63 - 1, got {numbers['seed']}")
    if not 1 <= numbers.get("samples", 1) <= MAX_SAMPLES:
        raise GenerationError(f"samples must be between 1 and {MAX_SAMPLES}, got {numbers['samples']}")
    request = GenerationRequest(prompt=prompt, then=NEXT[choice], **numbers)
    session.prepare(request)  # every other check (max tokens against the model's length, guidance >= 0, ...)
    return request


def create_app(session: Session, ckpt: str = "") -> FastAPI:
    app = FastAPI(title="mot serve")
    turns = TurnQueue()
    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict:
        defaults = GenerationRequest()
        return {"ckpt": ckpt, "modalities": session.modalities, "next": [m for m in NEXT if m == "text" or
                                                                           m in session.modalities],
                "max_seq_len": session.model.cfg.max_seq_len, "max_samples": MAX_SAMPLES,
                "defaults": {k: getattr(defaults, k) for k in NUMBERS}}

    @app.post("/api/generate")
    async def generate(http: Request):
        try:
            body = await http.json()
        except ValueError:
            return JSONResponse({"error": "the request body is not JSON"}, status_code=400)
        try:
            request = parse_request(body, session)
        except GenerationError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        if turns.waiting() >= MAX_WAITING:
            return JSONResponse({"error": f"the queue is full ({MAX_WAITING} requests waiting); try again later"},
                                status_code=503)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        ticket = turns.ticket()
        job.emit({"type": "queued", "ahead": turns.ahead(ticket)})
        threading.Thread(target=_run, args=(session, request, turns, ticket, job), daemon=True).start()
        return StreamingResponse(_lines(events, job), media_type="application/x-ndjson")

    return app


class Cancelled(Exception):
    """The client went away: its generation stops at the next token."""


@dataclass
class Job:
    emit: Callable[[dict], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


def _run(session: Session, request: GenerationRequest, turns: TurnQueue, ticket: int, job: Job) -> None:
    """One generation in its turn; every outcome ends the stream with "done" or "error", and frees the turn."""
    turns.wait(ticket)
    try:
        if job.cancelled.is_set():
            return
        job.emit({"type": "start"})
        prompt = session.prepare(request)[0]
        spans = SpanEvents(session.vocab, session.tokenizers, prompt, request.samples, job.emit, session.codecs)

        def on_token(sample: int, token: int) -> None:
            if job.cancelled.is_set():
                raise Cancelled
            spans.on_token(sample, token)

        start = time.perf_counter()
        results = session.generate(request, on_token=on_token)
        spans.finish(results)
        job.emit({"type": "done", "tokens": sum(len(r.tokens) for r in results),
                  "seconds": round(time.perf_counter() - start, 3)})
    except Cancelled:
        pass
    except GenerationError as err:
        job.emit({"type": "error", "message": str(err)})
    except Exception as err:  # the stream must end and the server go on; the page shows what happened
        job.emit({"type": "error", "message": f"generation failed: {type(err).__name__}: {err}"})
    finally:
        turns.release()


async def _lines(events: asyncio.Queue, job: Job) -> AsyncIterator[str]:
    """The events as lines; waiting costs no thread. A client that disconnects cancels its job."""
    try:
        while True:
            event = await events.get()
            yield json.dumps(event) + "\n"
            if event["type"] in ("done", "error"):
                return
    finally:
        job.cancelled.set()
