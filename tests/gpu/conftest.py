"""The GPU suite: every test under tests/gpu/ is marked `gpu` and compares a CUDA code path with the CPU reference.

    pytest -m gpu -s tests/gpu      # on a machine with a CUDA device; -s shows the measured agreement rates

Without a CUDA device the tests are collected and skipped, and the reason is printed after the run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
CUDA = torch.cuda.is_available()
REASON = "no CUDA device (torch.cuda.is_available() is False); run `pytest -m gpu -s tests/gpu` on a GPU machine"


def _under_here(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


@pytest.hookimpl(tryfirst=True)  # before `-m gpu` / `-m 'not gpu'` select on the marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _under_here(item):
            item.add_marker(pytest.mark.gpu)
            if not CUDA:
                item.add_marker(pytest.mark.skip(reason=f"gpu: {REASON}"))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "tests/gpu/" in r.nodeid]
    if skipped and not CUDA:
        terminalreporter.write_line(f"tests/gpu: {len(skipped)} GPU tests skipped: {REASON}")


@pytest.fixture(autouse=True, scope="module")
def _fresh_compile_caches():
    """Each module starts with empty torch.compile caches, so none depends on what earlier ones compiled: past
    dynamo's limit of variants `masks.flex` would fall back to eager flex_attention, which ignores a BlockMask's
    tables (docs/results/scaling/README.md, 2026-12-03 fifth session)."""
    if CUDA:
        torch._dynamo.reset()
    yield
