"""Soak the multi-process tests: run them N times in a row, optionally on a busy CPU, and report
every run (pass / fail, duration, tests that failed, any rank that ended with a non-zero status).

    python benchmarks/soak_multiprocess.py --runs 50
    python benchmarks/soak_multiprocess.py --runs 10 --busy 2          # 2 busy-loop processes meanwhile
    python benchmarks/soak_multiprocess.py --runs 5 --tests tests/test_distributed.py::test_trainer_with_sp_size_2_matches_one_process

The tests are those that start several processes (mp.spawn / torch.multiprocessing, torchrun,
accelerate launch), found with `grep -l 'nproc\\|mp.spawn\\|torchrun\\|WORLD_SIZE' tests/*.py`;
MULTIPROCESS_TESTS lists them, and the script warns when a test file uses those words but is not
listed. The tests assert that every process they start exits with status 0 (a SIGABRT at exit
fails them); this script also picks the ranks' exit statuses out of the output (mp.spawn, torch
elastic and the tests' own messages). Exit status: 0 if every run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MULTIPROCESS_TESTS = [
    # tests/test_distributed.py: everything but its two single-process tests
    "tests/test_distributed.py::test_primitives_match_their_definition_forward_and_backward",
    "tests/test_distributed.py::test_sharded_stdit3_equals_single_process",
    "tests/test_distributed.py::test_head_fallback_and_modes_are_the_ones_asked_for",
    "tests/test_distributed.py::test_sampling_gives_the_single_process_latent",
    "tests/test_distributed.py::test_pipeline_gives_the_single_process_video",
    "tests/test_distributed.py::test_torchrun_cli_writes_one_output_equal_to_one_process",
    "tests/test_distributed.py::test_a_dp_x_sp_mesh_of_4_processes",
    "tests/test_distributed.py::test_a_failing_rank_brings_the_others_down_with_a_clear_message",
    "tests/test_distributed.py::test_fail_together_stops_every_rank_with_the_first_error",
    "tests/test_distributed.py::test_trainer_with_sp_size_2_matches_one_process",
    # tests/test_training_e2e.py: its two `accelerate launch --num_processes 2` runs
    "tests/test_training_e2e.py::test_accelerate_launch_two_cpu_processes_stay_in_sync",
    "tests/test_training_e2e.py::test_sequence_parallel_over_two_processes_trains_like_one",
    # tests/test_data.py: the scores sharded over two mp.spawn ranks
    "tests/test_data.py::test_motion_score_and_camera_motion_two_processes_equal_one",
]
MULTIPROCESS_WORDS = re.compile(r"nproc|mp\.spawn|torchrun|WORLD_SIZE")

# How the launchers and the tests report a rank that did not end with status 0.
RANK_EXIT = re.compile(
    r"process \d+ terminated with (?:exit code -?\d+|signal \w+)"  # torch.multiprocessing (mp.spawn)
    r"|exitcode\s*:\s*-?\d+[^\n]*"  # torch elastic (torchrun, accelerate launch)
    r"|Signal \d+ \(SIG\w+\)[^\n]*"
    r"|terminate called[^\n]*|Aborted \(core dumped\)|Fatal Python error[^\n]*"
    r"|exit status(?:es)? \[[^\]]*\]"  # the tests' own messages
    r"|^E\s+(?:assert|AssertionError)[^\n]*(?:codes|returncode)[^\n]*",
    re.MULTILINE,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=50, help="how many times to run the tests (default 50)")
    p.add_argument("--busy", type=int, default=0, help="busy-loop processes to run meanwhile (default 0)")
    p.add_argument("--tests", nargs="+", default=MULTIPROCESS_TESTS, help="pytest node ids (default: the multi-process tests)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is killed and counted as failed")
    p.add_argument("--log-dir", type=Path, default=None, help="keep each run's pytest output here (default: a temporary folder)")
    args = p.parse_args(argv)
    for name in ("runs", "busy"):
        if getattr(args, name) < (1 if name == "runs" else 0):
            p.error(f"--{name} {getattr(args, name)}: expected an integer >= {1 if name == 'runs' else 0}")
    return args


def unlisted_test_files(tests: list[str]) -> list[str]:
    """Test files that start processes (by the grep above) but have no test in `tests`."""
    listed = {t.split("::")[0] for t in tests}
    found = [f"tests/{f.name}" for f in sorted((REPO / "tests").glob("test_*.py")) if MULTIPROCESS_WORDS.search(f.read_text())]
    return [f for f in found if f not in listed]


def start_busy(k: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]


def outcomes(junit: Path) -> tuple[int, list[str]]:
    """(tests passed, ids of the tests that failed or errored) from pytest's junit XML."""
    if not junit.exists():
        return 0, ["(no report: pytest did not finish)"]
    passed, failed = 0, []
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is None:
            passed += 1
    return passed, failed


def run_once(i: int, args, log_dir: Path) -> dict:
    junit, log = log_dir / f"run{i:03d}.xml", log_dir / f"run{i:03d}.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args.tests]
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # pytest and the ranks it started: its own session
            code = proc.wait()
    seconds = time.monotonic() - start
    passed, failed = outcomes(junit)
    ranks = sorted({m.group(0).strip() for m in RANK_EXIT.finditer(log.read_text(errors="replace"))})
    return {"ok": code == 0 and not failed, "code": code, "seconds": seconds, "passed": passed, "failed": failed,
            "ranks": ranks, "log": log}  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    for f in unlisted_test_files(args.tests):
        print(f"warning: {f} seems to start processes but none of its tests is soaked; add them to MULTIPROCESS_TESTS",
              file=sys.stderr)  # fmt: skip
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="soak_multiprocess_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"{args.runs} runs of {len(args.tests)} tests, {args.busy} busy processes; logs in {log_dir}", flush=True)
    busy = start_busy(args.busy)
    results = []
    try:
        for i in range(1, args.runs + 1):
            r = run_once(i, args, log_dir)
            results.append(r)
            line = f"run {i:3d}/{args.runs}  {'PASS' if r['ok'] else 'FAIL'}  {r['seconds']:7.1f} s  {r['passed']} passed"
            if not r["ok"]:
                line += f", pytest status {r['code']}, failed: {', '.join(r['failed']) or '-'}; log {r['log']}"
            print(line, flush=True)
            for rank in r["ranks"]:
                print(f"      rank exit: {rank}", flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    fails = [i + 1 for i, r in enumerate(results) if not r["ok"]]
    times = sorted(r["seconds"] for r in results)
    print(f"{len(results) - len(fails)}/{len(results)} runs passed; failed runs: {fails or 'none'}; duration "
          f"median {times[len(times) // 2]:.1f} s, max {times[-1]:.1f} s; busy processes: {args.busy}")  # fmt: skip
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
