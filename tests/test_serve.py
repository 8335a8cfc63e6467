"""`mot serve`: the streaming endpoint over HTTP, and the page in a real headless browser (Debian's chromium
driven by selenium) on a tiny random model with the shipped demo tokenizers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import uvicorn

from mot.config import ModalityConfig, ModelConfig, RunConfig, TrainConfig, config_to_dict
from mot.generate.session import GenerationRequest, Session
from mot.model import MoTTransformer
from mot.runs import load_for_inference
from mot.serve.app import Job, TurnQueue, _run, create_app
from mot.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def demo_like_run(folder: Path) -> Path:
    """A tiny random MoT over the demo tokenizers' vocabularies, saved as a run folder with them."""
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=512,
                      modalities=[ModalityConfig("text", 512), ModalityConfig("image", 512),
                                  ModalityConfig("speech", 128)])
    torch.manual_seed(0)
    model = MoTTransformer(cfg)
    run = RunConfig(name="serve", model=cfg, train=TrainConfig(seq_len=512))
    ckpt.save_checkpoint(folder / "checkpoints", 0, model.state_dict(), {},
                         {"config": config_to_dict(run), "tokenizers": ""}, keep=1)
    shutil.copytree(REPO / "tokenizers" / "demo", folder / "tokenizers")
    return folder


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    # MOT_SERVE_CKPT=runs/demo: the README main job's trained checkpoint instead (for the README's screenshot)
    run = os.environ.get("MOT_SERVE_CKPT") or demo_like_run(tmp_path_factory.mktemp("serve") / "run")
    model, _, tokenizers = load_for_inference(run)
    return Session(model, tokenizers, device="cpu"), str(run)


@pytest.fixture(scope="module")
def server(session):
    app = create_app(*session)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def post(url: str, body) -> tuple[int, list[dict] | dict]:
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/api/generate", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, [json.loads(line) for line in response.read().decode().splitlines()]
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


GOOD = {"prompt": "a red circle", "next": "image", "guidance_scale": "3", "samples": "2", "seed": "1",
        "max_tokens": "80", "temperature": "1"}


@pytest.mark.parametrize("change, message", [
    ({"prompt": "   "}, "the prompt is empty"),
    ({"next": "video"}, "unknown modality 'video'"),
    ({"max_tokens": "1000000"}, "exceeds the model's max_seq_len 512"),
    ({"guidance_scale": "abc"}, "guidance scale must be a number, got 'abc'"),
    ({"samples": "two"}, "samples must be a whole number"),
    ({"samples": "0"}, "samples must be between 1 and 8"),
    ({"guidance_scale": "-1"}, "guidance_scale must be >= 0"),
    ({"colour": "red"}, "unknown settings ['colour']"),
])
def test_bad_requests_get_a_clear_message_and_the_server_goes_on(server, change, message):
    status, answer = post(server, {**GOOD, **change})
    assert status == 400 and message in answer["error"]
    status, events = post(server, {**GOOD, "max_tokens": "12", "next": "text", "samples": "1"})
    assert status == 200 and events[-1]["type"] == "done"


def test_not_json_is_refused(server):
    status, answer = post(server, "{not json")
    assert status == 400 and "not JSON" in answer["error"]


def test_generation_streams_text_then_an_image_per_sample(server):
    status, events = post(server, GOOD)
    assert status == 200
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["queued", "start"] and kinds[-1] == "done"
    images = [e for e in events if e["type"] == "image"]
    assert sorted(e["sample"] for e in images) == [0, 1]  # the prompt asked for an image: each sample has one
    assert all(e["src"].startswith("data:image/png;base64,") for e in images)
    assert events[-1]["tokens"] > 2 * 64  # two 8x8 image spans and more


def test_speech_comes_as_a_wav_clip(server):
    status, events = post(server, {**GOOD, "next": "speech", "samples": "1", "max_tokens": "40"})
    audio = [e for e in events if e["type"] == "audio"]
    assert status == 200 and len(audio) == 1 and audio[0]["src"].startswith("data:audio/wav;base64,")


def test_turns_are_served_in_order():
    turns, order = TurnQueue(), []
    tickets = [turns.ticket() for _ in range(3)]
    assert [turns.ahead(t) for t in tickets] == [0, 1, 2]

    def job(ticket):
        turns.wait(ticket)
        order.append(ticket)
        turns.release()

    threads = [threading.Thread(target=job, args=(t,)) for t in reversed(tickets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert order == tickets


def test_a_cancelled_job_stops_at_its_next_token_and_frees_its_turn(session):
    """A client that disconnects sets its job's flag (the stream's `finally`): the generation stops at the next
    token, nothing more is sent, and the next request gets the turn."""
    turns, events = TurnQueue(), []
    job = Job(events.append)

    def emit(event):
        events.append(event)
        if event["type"] == "text":  # the client goes away after the first streamed text
            job.cancelled.set()

    job.emit = emit
    request = GenerationRequest(prompt="a red circle", max_tokens=200, temperature=0)
    _run(session[0], request, turns, turns.ticket(), job)
    kinds = [e["type"] for e in events]
    assert kinds == ["start", "text"]  # no "done": stopped after the token that was streamed
    assert turns.waiting() == 0

    early = Job(events.append)  # cancelled while still queued: never starts
    early.cancelled.set()
    events.clear()
    _run(session[0], request, turns, turns.ticket(), early)
    assert events == [] and turns.waiting() == 0


# ---------------------------------------------------------------- the page in a real browser


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    assert not missing, f"{missing} not found: apt-get install chromium chromium-driver (see the README's test command)"
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,1300"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def _submit(driver, **fields) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    form = driver.find_element(By.ID, "form")
    finished = int(form.get_attribute("data-finished") or 0)
    for name, value in fields.items():
        element = driver.find_element(By.ID, name)
        if name == "next":
            Select(element).select_by_value(value)
        else:
            element.clear()
            element.send_keys(value)
    driver.find_element(By.ID, "go").click()
    WebDriverWait(driver, 120).until(lambda d: int(form.get_attribute("data-finished") or 0) > finished)


def test_the_page_generates_images_and_speech_and_reports_bad_input(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server)
    assert browser.title == "mot serve"
    message = lambda: browser.find_element(By.ID, "message").text
    images = lambda: browser.find_elements(By.CSS_SELECTOR, "#samples-out img")

    _submit(browser, prompt="a blue square on the left", next="image", samples="2", max_tokens="80")
    assert message() == ""
    assert len(images()) == 2
    assert all(browser.execute_script("return arguments[0].naturalWidth", img) == 64 for img in images())
    assert browser.find_element(By.ID, "status").text.startswith("done:")
    browser.save_screenshot(str(tmp_path / "serve_page.png"))
    if os.environ.get("MOT_SERVE_SCREENSHOT"):  # the README's: MOT_SERVE_SCREENSHOT=docs/results/serve/x.png
        shutil.copy(tmp_path / "serve_page.png", os.environ["MOT_SERVE_SCREENSHOT"])

    _submit(browser, prompt="a green triangle", next="speech", samples="1", max_tokens="40")
    audio = browser.find_elements(By.CSS_SELECTOR, "#samples-out audio")
    assert len(audio) == 1 and audio[0].get_attribute("src").startswith("data:audio/wav")

    for fields, expected in ((dict(prompt=" "), "the prompt is empty"),
                             (dict(prompt="a red circle", guidance_scale="abc"), "guidance scale must be a number"),
                             (dict(guidance_scale="3", max_tokens="1000000"), "exceeds the model's max_seq_len")):
        _submit(browser, **fields)
        assert expected in message()
        assert not images()
    # A modality the page does not offer (sent as a crafted form value): refused by the server.
    browser.execute_script("const o = document.createElement('option'); o.value = 'video'; o.text = 'video';"
                           "document.getElementById('next').appendChild(o);")
    _submit(browser, max_tokens="80", next="video")
    assert "unknown modality 'video'" in message()
    _submit(browser, next="image", samples="1")  # and the next request is served
    assert message() == "" and len(images()) == 1
