"""Shared test fixtures: golden reference bundles, tiny configs, deterministic CPU torch, and a
heartbeat line for tests that run long."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

# The official reference bundles ship with the repository (tests/reference/README.md says how
# they were made); OPENSORA_REFERENCE_DIR may name another copy, e.g. ../shared/reference.
BUNDLED_REFERENCE = Path(__file__).resolve().parent / "reference"


def reference_dir() -> Path | None:
    """The folder of official reference data: $OPENSORA_REFERENCE_DIR when it names a folder,
    else tests/reference; None when neither exists. The one place that finds it."""
    value = os.environ.get("OPENSORA_REFERENCE_DIR")
    if value and Path(value).is_dir():
        return Path(value)
    if (BUNDLED_REFERENCE / "golden").is_dir():
        return BUNDLED_REFERENCE
    return None


@pytest.fixture(scope="session")
def reference():
    """The folder of official reference data, or skip when it is not available."""
    path = reference_dir()
    if path is None:
        pytest.skip(
            "reference data not available: tests/reference (it ships with the repository) is "
            "missing and OPENSORA_REFERENCE_DIR does not name a folder"
        )
    return path


class Golden:
    """One golden bundle: `.meta` is the sidecar JSON, indexing gives tensors by key."""

    def __init__(self, folder: Path, name: str):
        from safetensors.torch import load_file

        self.name = name
        self.meta = json.loads((folder / f"{name}.json").read_text())
        self.tensors = load_file(str(folder / f"{name}.safetensors"))

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}


@pytest.fixture(scope="session")
def golden(reference):
    """golden("stdit3_a") -> Golden bundle from reference/golden/."""
    cache: dict[str, Golden] = {}

    def load(name: str) -> Golden:
        if name not in cache:
            cache[name] = Golden(reference / "golden", name)
        return cache[name]

    return load


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


# Heartbeat: a test that runs longer than the interval (30 s; OPENSORA_TEST_HEARTBEAT_S changes it,
# 0 turns it off) prints "  ... still running <test id> (N s)" every interval, so a slow test on a
# busy machine does not look stuck. One daemon thread per test phase (setup, call, teardown),
# joined before the phase returns, so it never writes while pytest's reporter does. It writes to a
# duplicate of the terminal's file descriptor taken at configure time: pytest captures fd 1 while
# a test runs, and the reporter's own stream would land in the capture.


def _heartbeat_interval() -> float:
    value = os.environ.get("OPENSORA_TEST_HEARTBEAT_S", "30")
    try:
        return float(value)
    except ValueError:
        raise pytest.UsageError(f"OPENSORA_TEST_HEARTBEAT_S={value!r}: expected seconds, e.g. 30 (0 = off)")


class _Heartbeat:
    def __init__(self, interval: float, terminal_writer, out):
        self.interval = interval
        self.tw = terminal_writer  # the reporter's writer, read only: is its current line non-empty?
        self.out = out  # the terminal, not captured
        self.start = time.monotonic()
        self.beats = 0
        self.width_after_beat = None  # the reporter's line width when we last wrote

    def write(self, line: str) -> None:
        width = self.tw.width_of_current_line  # progress dots may have left the line open
        newline = "\n" if width and width != self.width_after_beat else ""
        self.out.write(f"{newline}{line}\n")
        self.out.flush()
        self.width_after_beat = width

    def _run(self, nodeid: str, stop: threading.Event) -> None:
        while not stop.wait(max(0.0, self.start + (self.beats + 1) * self.interval - time.monotonic())):
            self.beats += 1
            elapsed = time.monotonic() - self.start
            self.write(f"  ... still running {nodeid} ({elapsed:.{0 if self.interval >= 10 else 1}f} s)")

    def _phase(self, item):
        stop = threading.Event()
        thread = threading.Thread(target=self._run, args=(item.nodeid, stop), name="test-heartbeat", daemon=True)
        thread.start()
        try:
            return (yield)
        finally:
            stop.set()
            thread.join()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.start, self.beats, self.width_after_beat = time.monotonic(), 0, None
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item):
        return (yield from self._phase(item))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        return (yield from self._phase(item))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item):
        return (yield from self._phase(item))


@pytest.fixture(scope="session", autouse=True)
def _text_cache_in_tmp(tmp_path_factory):
    """`opensora generate` keeps prompt embeddings in ~/.cache by default: the tests' commands
    (also the subprocesses they start) use a folder of the session instead."""
    old = os.environ.get("OPENSORA_TEXT_CACHE")
    os.environ["OPENSORA_TEXT_CACHE"] = str(tmp_path_factory.mktemp("text_cache"))
    yield
    if old is None:
        os.environ.pop("OPENSORA_TEXT_CACHE", None)
    else:
        os.environ["OPENSORA_TEXT_CACHE"] = old


@pytest.hookimpl(trylast=True)  # after the terminal reporter exists
def pytest_configure(config):
    interval = _heartbeat_interval()
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if interval <= 0 or reporter is None or hasattr(config, "workerinput"):  # off, -p no:terminal, xdist worker
        return
    try:  # capture is suspended at configure time: fd 1 is the terminal here
        out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", errors="replace")
    except (AttributeError, OSError, ValueError):  # stdout without a descriptor (embedded runs)
        return
    config._opensora_heartbeat_out = out
    config.pluginmanager.register(_Heartbeat(interval, config.get_terminal_writer(), out), "opensora-heartbeat")


def pytest_unconfigure(config):
    out = getattr(config, "_opensora_heartbeat_out", None)
    if out is not None:
        out.close()
