"""The heartbeat in tests/conftest.py: a test that runs past the interval says it is still running,
on the terminal, without touching the test's captured output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_pytest(folder: Path, interval: str, *args: str) -> subprocess.CompletedProcess:
    (folder / "pytest.ini").write_text("[pytest]\n")  # pins the rootdir: no project settings
    env = {**os.environ, "OPENSORA_TEST_HEARTBEAT_S": interval, "PYTHONPATH": str(TESTS)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", *args],
        cwd=folder, env=env, capture_output=True, text=True, timeout=120,
    )


def test_a_slow_test_prints_still_running_lines_and_keeps_its_capture(tmp_path):
    (tmp_path / "test_sleep.py").write_text(
        "import time\n"
        "def test_quick():\n    pass\n"
        "def test_sleeps():\n    print('captured' + '-by-pytest')\n    time.sleep(2)\n    assert False\n"
    )
    result = run_pytest(tmp_path, "0.5", "-q")
    lines = result.stdout.splitlines()
    beats = [line for line in lines if line.startswith("  ... still running test_sleep.py::test_sleeps (")]
    assert len(beats) >= 2, result.stdout
    assert not any("test_quick" in line for line in beats)
    assert lines[0] == "."  # the progress dot of test_quick, then the heartbeat on its own line
    # the test's own output stays captured: shown once, in its failure report, after the beats
    assert result.stdout.count("captured-by-pytest") == 1
    assert result.stdout.index("captured-by-pytest") > result.stdout.index(beats[-1])
    assert "1 failed, 1 passed" in result.stdout


def test_zero_turns_it_off(tmp_path):
    (tmp_path / "test_sleep.py").write_text("import time\ndef test_sleeps():\n    time.sleep(1)\n")
    result = run_pytest(tmp_path, "0", "-q")
    assert "still running" not in result.stdout and "1 passed" in result.stdout, result.stdout
