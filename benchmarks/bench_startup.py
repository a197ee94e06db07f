"""Start-up and loading, before and after, side by side in one run.

    python benchmarks/bench_startup.py                  # before = HEAD, after = the working tree
    python benchmarks/bench_startup.py --base HEAD~3 --runs 7

"Before" is the commit `--base` (default HEAD) checked out in a temporary `git worktree`
(created under a temporary folder and removed at the end); "after" is this working tree,
uncommitted changes included. Every figure is a fresh Python process run with the tree's
folder first on sys.path, the variants alternating run by run, and the table gives medians
over `--runs` rounds and the after/before ratio:

    import torch          python -c "import torch" (the same for both: the floor of any run)
    import opensora_sdk   the package alone
    from_preset() + encode
                          OpenSoraPipeline.from_preset() and one prompt encoded, in a process
                          that has already imported torch and the pipeline module (models + T5
                          + tokenizer: a tree that defers T5 loads it at that encode)
    opensora generate     the whole command with the built-in model, from outside (Python
                          start, imports, loading, generating, writing the mp4), split into
                          start-up (process wall minus the command's own "done in"), loading
                          and generating as the command reports them; its text cache
                          ($OPENSORA_TEXT_CACHE) is an empty folder: the prompt is new
    generate, same prompt again
                          the same command once more with that folder: a tree with the text
                          cache finds the prompt there and never loads T5 (nor transformers)
    opensora --help       the whole command, from outside

It also says which heavy modules each tree imports for `--help` and for a generation, and
whether the trees wrote the same mp4 bytes for the same seed, and each tree for the new and the
repeated prompt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving right on a black background"
HEAVY = ("torch", "transformers", "torch._dynamo", "sympy", "scipy", "av", "PIL", "gradio", "peft", "tqdm")

# Run inside the measured tree: check that its opensora_sdk is the one imported.
_PREAMBLE = (
    "import sys, time, json\n"
    "root = sys.argv[1]\n"
    "sys.path.insert(0, root)\n"
)
_CHECK = "import opensora_sdk\nassert opensora_sdk.__file__.startswith(root), opensora_sdk.__file__\n"
PROBES = {
    "import_sdk": _PREAMBLE + "t = time.perf_counter()\n" + _CHECK + "print(json.dumps({'s': time.perf_counter() - t}))\n",
    "from_preset": _PREAMBLE + _CHECK + (
        "t = time.perf_counter()\nimport torch\nt_torch = time.perf_counter() - t\n"
        "from opensora_sdk.pipeline import OpenSoraPipeline\n"
        "t = time.perf_counter()\npipe = OpenSoraPipeline.from_preset(device='cpu', progress=False)\n"
        "pipe.text_encoder.encode('a cat')\n"
        "print(json.dumps({'s': time.perf_counter() - t, 'torch_s': t_torch}))\n"
    ),
    "help_modules": _PREAMBLE + _CHECK + (
        "import contextlib, io\nfrom opensora_sdk.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\n"
        f"print(json.dumps({{'modules': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    ),
    "generate_modules": _PREAMBLE + _CHECK + (
        "import contextlib, io\nfrom opensora_sdk.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    main(['generate', '--prompt', 'a cat', '--num-sampling-steps', '2', '--save-dir', sys.argv[2]])\n"
        f"print(json.dumps({{'modules': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    ),
}
DONE = re.compile(r"done in ([\d.]+) s \(load ([\d.]+) s")


def run_probe(name: str, root: Path, *extra: str, text_cache: Path) -> dict:
    env = {**os.environ, "OPENSORA_TEXT_CACHE": str(text_cache)}
    out = subprocess.run([sys.executable, "-c", PROBES[name], str(root), *extra], capture_output=True, text=True,
                         cwd=tempfile.gettempdir(), check=False, env=env)
    if out.returncode:
        raise RuntimeError(f"{name} in {root} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_command(root: Path, args: list[str], text_cache: Path) -> tuple[float, str]:
    """Wall seconds of `python -m opensora_sdk ARGS` with `root` first on sys.path and its text
    cache in `text_cache`, and its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OPENSORA_TEXT_CACHE": str(text_cache)}  # fmt: skip
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "opensora_sdk", *args], capture_output=True, text=True, env=env,
                         cwd=tempfile.gettempdir(), check=False)
    wall = time.perf_counter() - t
    if out.returncode:
        raise RuntimeError(f"opensora {' '.join(args)} in {root} failed:\n{out.stderr[-2000:]}")
    return wall, out.stdout + out.stderr


def one_round(trees: dict[str, Path], work: Path, k: int, steps: int | None) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, cwd=tempfile.gettempdir())
    torch_s = time.perf_counter() - t
    for name, root in trees.items():
        row = rows[name] = {"import torch": torch_s}
        cache = work / f"text-cache-{name}-{k}"  # empty: the prompt is new to this run
        row["import opensora_sdk"] = run_probe("import_sdk", root, text_cache=cache)["s"]
        row["from_preset() + encode"] = run_probe("from_preset", root, text_cache=cache)["s"]
        args = ["generate", "--prompt", PROMPT, "--seed", "7"]
        if steps is not None:
            args += ["--num-sampling-steps", str(steps)]
        wall, text = run_command(root, [*args, "--save-dir", str(work / f"{name}-{k}")], cache)
        row["opensora generate"] = wall
        done = DONE.search(text)
        if done:
            row["  start-up (imports)"] = wall - float(done.group(1))
            row["  loading"] = float(done.group(2))
            row["  generating + saving"] = float(done.group(1)) - float(done.group(2))
        again = work / f"{name}-{k}-again"
        row["generate, same prompt again"] = run_command(root, [*args, "--save-dir", str(again)], cache)[0]
        row["opensora --help"] = run_command(root, ["--help"], cache)[0]
    return rows


def mp4_digest(folder: Path) -> str:
    files = sorted(folder.glob("*.mp4"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16] if files else "none"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="HEAD",
                        help="the 'before' commit (default HEAD: the working tree's changes are 'after')")
    parser.add_argument("--runs", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps of the generate runs (default: the built-in model's)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: expected an integer >= 1")

    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base], check=True,
                       capture_output=True)
        try:
            trees = {"before": base, "after": ROOT}
            rev = subprocess.run(["git", "-C", str(base), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, check=True).stdout.strip()
            print(f"before: {args.base} ({rev}) in a temporary worktree; after: {ROOT} (working tree)")
            print(f"cpu threads: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}, runs: {args.runs}\n")
            for name, root in trees.items():
                cache = Path(tmp) / f"text-cache-mods-{name}"
                help_mods = run_probe("help_modules", root, text_cache=cache)["modules"]
                gen_mods = run_probe("generate_modules", root, str(Path(tmp) / f"mods-{name}"), text_cache=cache)["modules"]
                print(f"{name:>6}: --help imports {help_mods or 'none of them'}; generate imports {gen_mods}")
            rounds = []
            for k in range(args.runs):
                order = dict(reversed(list(trees.items()))) if k % 2 else trees  # alternate who goes first
                rounds.append(one_round(order, Path(tmp), k, args.steps))
                print(f"  round {k + 1}/{args.runs} done", file=sys.stderr)
            digests = {f"{name}{again}": mp4_digest(Path(tmp) / f"{name}-0{again}")
                       for name in trees for again in ("", "-again")}  # fmt: skip
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False,
                           capture_output=True)

    keys = list(dict.fromkeys(k for r in rounds for v in r.values() for k in v))
    print(f"\n{'median seconds':<26}{'before':>9}{'after':>9}{'after/before':>14}")
    for key in keys:
        med = {}
        for name in trees:
            values = [r[name][key] for r in rounds if key in r[name]]
            med[name] = statistics.median(values) if values else float("nan")
        ratio = med["after"] / med["before"] if med["before"] else float("nan")
        print(f"{key:<26}{med['before']:>9.2f}{med['after']:>9.2f}{ratio:>13.2f}x")
    def same(a, b):
        return "yes" if digests[a] == digests[b] else "NO"

    print(f"\nsame mp4 bytes for the same seed: before and after {same('before', 'after')} (differs where the "
          f"built-in model's weights differ between the trees); after, a new and a cached prompt "
          f"{same('after', 'after-again')}; before, twice {same('before', 'before-again')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
