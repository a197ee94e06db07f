"""Docs as tests: the code blocks of the READMEs that say they run, run, as written.

Marking. A block is tested when the line right before its opening fence is an HTML comment
(GitHub does not show it):

    <!-- test: runs on the built-in model -->          runs as written, on the built-in model
    <!-- test: plan only (needs the v1.2 weights) -->  every call is checked, no model runs

Unmarked blocks are not run: install lines, the test command itself, multi-GPU and training
commands, output listings. Any other text after "test:", or a marker not followed by a fence,
fails `test_markers`, so a typo cannot switch a block off.

Running. Each block runs in its own temporary folder in which the repository's top-level
folders are linked (`workflows/...` works as from a clone; outputs land in the temporary folder).

* bash: `bash -e -o pipefail` in a subprocess, offline, this environment's `opensora` first on
  PATH. `pip install ...` lines are dropped (the package is installed); in `pip install ... &&
  rest` only `rest` runs. Nothing else is changed.
* python: `exec` in this process.
* plan only, bash: an `opensora` wrapper first on PATH runs `opensora generate ...` as
  `opensora info ...` (options only `generate` has, such as `--save-dir`, are dropped): the same
  argument checks, no weights read.
* plan only, python: `opensora_sdk.OpenSoraPipeline` is `PlanOnlyPipeline` while the block runs:
  its constructors read no weights (the architecture from configs, as `opensora info`), its
  `__call__` and `plan` are the real ones, its `generate` records the checked plan and returns
  stand-ins whose `save()` checks the path.

Time: the blocks run with one torch thread (two threads per process stall each other on a shared
2-core machine); this file takes about 45 s on 2 cores shared with other work.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import opensora_sdk
import opensora_sdk.pipeline
from opensora_sdk.pipeline import OpenSoraPipeline

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "training/README.md", "comfy_nodes/README.md"]
RUNS, PLAN = "runs on the built-in model", "plan only"
MARKER = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_LINKED = {".git", ".venv", "samples", "outputs", "output", "out", "data", "build", "dist"}


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository
    line: int  # of the opening fence
    lang: str
    kind: str  # RUNS or PLAN
    code: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def read_blocks(doc: str) -> tuple[list[Block], list[str]]:
    """The marked blocks of one Markdown file, and the marker errors."""
    lines = (ROOT / doc).read_text("utf-8").splitlines()
    blocks, errors, i = [], [], 0
    while i < len(lines):
        marker = MARKER.match(lines[i])
        if not marker:
            i += 1
            continue
        text, fence = marker.group(1), FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        kind = RUNS if text == RUNS else PLAN if text.startswith(PLAN) else None
        if kind is None:
            errors.append(f"{doc}:{i + 1}: unknown marker {text!r}; use {RUNS!r} or {PLAN + ' (why)'!r}")
        if fence is None or fence.group(1) not in ("bash", "python"):
            errors.append(f"{doc}:{i + 1}: a test marker must be right before a ```bash or ```python fence")
            i += 1
            continue
        end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), len(lines))
        if kind is not None:
            blocks.append(Block(doc, i + 2, fence.group(1), kind, "\n".join(lines[i + 2 : end]) + "\n"))
        i = end + 1
    return blocks, errors


BLOCKS = [block for doc in DOCS for block in read_blocks(doc)[0]]


def test_markers():
    errors = [error for doc in DOCS for error in read_blocks(doc)[1]]
    assert not errors, "\n".join(errors)
    # the README's own examples stay tested: the Quickstart command and both Python blocks
    readme = [b for b in BLOCKS if b.doc == "README.md"]
    assert sum(b.kind == RUNS for b in readme) >= 2 and sum(b.kind == PLAN for b in readme) >= 1, readme


# ---- running ---------------------------------------------------------------------------------


def workdir(tmp_path: Path) -> Path:
    """A folder that looks like a clone: the repository's top-level entries linked in."""
    for entry in ROOT.iterdir():
        if entry.name not in NOT_LINKED and not entry.name.startswith(".") and not entry.name.endswith(".egg-info"):
            (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


def without_pip_install(code: str) -> str:
    kept = []
    for line in code.splitlines():
        if line.lstrip().startswith("pip install"):
            if " && " not in line:
                continue
            line = line.split(" && ", 1)[1]
        kept.append(line)
    return "\n".join(kept) + "\n"


PLAN_ONLY_CLI = '''\
"""`opensora` for plan-only README blocks (tests/test_readme.py): `generate` runs as `info`."""
import argparse, sys
from opensora_sdk import cli

argv = sys.argv[1:]
if argv[:1] == ["generate"]:
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    info = commands["info"]._option_string_actions
    only = {s: a for s, a in commands["generate"]._option_string_actions.items() if s not in info}
    rest, args = argv[1:], ["info"]
    while rest:
        word = rest.pop(0)
        action = only.get(word.split("=", 1)[0])
        if action is None:
            args.append(word)
        elif "=" not in word and action.nargs != 0:
            rest.pop(0)  # its value
    argv = args
sys.exit(cli.main(argv))
'''


def run_bash(block: Block, folder: Path) -> subprocess.CompletedProcess:
    bin_dir = folder / ".readme-bin"
    bin_dir.mkdir()
    path = [str(Path(sys.executable).parent)]
    if block.kind == PLAN:
        wrapper = bin_dir / "opensora"
        wrapper.write_text(f"#!{sys.executable}\n{PLAN_ONLY_CLI}")
        wrapper.chmod(0o755)
        path.insert(0, str(bin_dir))
    env = {
        **os.environ, "PATH": os.pathsep.join([*path, os.environ.get("PATH", "")]),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    }
    script = without_pip_install(block.code)
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (
        f"{block.id} exited {result.returncode}\n--- script\n{script}--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
    )
    return result


class PlannedVideo:
    """What a plan-only call returns instead of a video: `save()` checks the path only."""

    def __init__(self, plan):
        self.plan, self.num_frames, self.height, self.width = plan, plan.total_frames, plan.height, plan.width

    def save(self, path, *args, **kwargs):
        from opensora_sdk.video_io import check_writable

        return check_writable(path, num_frames=self.num_frames)


class PlanOnlyPipeline(OpenSoraPipeline):
    """An `OpenSoraPipeline` without models: the real `__call__` and `plan()` check every
    argument against the architecture read from configs (as `opensora info`); `generate()`
    records the plan instead of running it."""

    plans: list = []

    def __init__(self, preset: str = "v1.2", **sources):
        from opensora_sdk.presets import get_preset, model_configs

        p = get_preset(preset)
        configs = model_configs(preset, **{k: v for k, v in sources.items() if isinstance(v, (str, os.PathLike))})
        self._facts, self.family, self.defaults = configs.facts, p.family, dict(p.defaults)
        self.max_latent_frames, self.sp_group, self.progress = p.latent_frame_limit, None, False

    @property
    def facts(self):
        return self._facts

    @classmethod
    def from_pretrained(cls, model=None, vae=None, text_encoder=None, **kwargs):
        return cls("v1.2", model=model, vae=vae, text_encoder=text_encoder)

    @classmethod
    def from_preset(cls, name=None, **kwargs):
        return cls(name or "builtin")

    def generate(self, plan, **kwargs):
        PlanOnlyPipeline.plans.append(plan)
        return [PlannedVideo(plan) for _ in plan.samples]


def run_python(block: Block, folder: Path) -> None:
    threads, cwd = torch.get_num_threads(), os.getcwd()
    with pytest.MonkeyPatch.context() as patch:
        if block.kind == PLAN:
            PlanOnlyPipeline.plans = []
            patch.setattr(opensora_sdk, "OpenSoraPipeline", PlanOnlyPipeline)
            patch.setattr(opensora_sdk.pipeline, "OpenSoraPipeline", PlanOnlyPipeline)
        patch.setenv("HF_HUB_OFFLINE", "1")
        try:
            torch.set_num_threads(1)
            os.chdir(folder)
            script = folder / f"readme_block_{block.line}.py"  # run as a file (tracebacks name the block)
            script.write_text(f"# {block.doc}, block at line {block.line}\n" + block.code)
            runpy.run_path(str(script), run_name="__readme__")
        finally:
            os.chdir(cwd)
            torch.set_num_threads(threads)
    if block.kind == PLAN:
        assert PlanOnlyPipeline.plans, f"{block.id}: a plan-only block that never calls the pipeline"


_ran: dict[str, tuple[Path, subprocess.CompletedProcess | None]] = {}


def run(block: Block, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess | None]:
    """Run a block once per session; its folder and (bash) its process."""
    if block.id not in _ran:
        folder = workdir(tmp_path_factory.mktemp("readme"))
        result = run_bash(block, folder) if block.lang == "bash" else run_python(block, folder)
        _ran[block.id] = (folder, result)
    return _ran[block.id]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs(block, tmp_path_factory):
    run(block, tmp_path_factory)


def test_quickstart_video_lands_where_the_readme_says(tmp_path_factory):
    quickstart = (ROOT / "README.md").read_text("utf-8").split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    said = re.search(r"`(\./samples/[^`]+\.mp4)`", quickstart)
    assert said, "the Quickstart names where the video lands"
    block = next(b for b in BLOCKS if b.doc == "README.md" and b.kind == RUNS and "opensora generate" in b.code)
    folder, result = run(block, tmp_path_factory)
    assert (folder / said.group(1)).is_file()
    assert Path(said.group(1)).as_posix().removeprefix("./") in result.stdout + result.stderr  # the path is printed
    assert re.search(r"sampling [\d.]+ s", result.stdout + result.stderr)  # and the time per stage


def test_plan_only_still_fails_on_bad_arguments(tmp_path, capsys):
    """Plan-only blocks are checked: `opensora generate` as `info` (generate-only options
    dropped) and the planning pipeline both reject what the real ones reject."""

    def plan_only_cli(*argv):
        with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit:
            patch.setattr(sys, "argv", ["opensora", *argv])
            script = tmp_path / "plan_only_cli.py"
            script.write_text(PLAN_ONLY_CLI)
            runpy.run_path(str(script), run_name="__main__")
        return exit.value.code, capsys.readouterr()

    code, out = plan_only_cli("generate", "--preset", "v1.2", "--prompt", "a", "--resolution", "240p",
                              "--num-frames", "4s", "--save-dir", "out/", "--sample-name=x", "--no-progress")
    assert code == 0 and "240" in out.out, out
    code, out = plan_only_cli("generate", "--preset", "v1.2", "--prompt", "a", "--resolution", "999p")
    assert code != 0 and "999p" in out.err, out
    code = "from opensora_sdk import OpenSoraPipeline\nOpenSoraPipeline.from_pretrained()('a', resolution='999p')\n"
    with pytest.raises(ValueError, match="999p"):
        run_python(Block("-", 1, "python", PLAN, code), tmp_path)
