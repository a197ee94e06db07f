"""Run a function over the items of a meta file in worker processes, resumably.

`run_journaled` feeds the unfinished items to `worker` (a top-level function of a light module,
returning `(result dict | None, error text)`), in this process (`workers <= 1`) or in a pool
of spawned processes, and records each answer in the `Journal` as it arrives. Ctrl-C or a
crash loses at most the items in flight; the next run starts after the recorded ones.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Sequence

from tqdm.auto import tqdm

from opensora_sdk.data.table import ERROR, Journal


def run_journaled(
    items: Sequence[tuple[int, object]],
    worker: Callable,
    journal: Journal,
    *,
    workers: int = 1,
    desc: str = "",
    progress: bool = True,
) -> dict[int, dict]:
    """Run `worker(arg)` for each (index, arg) not yet in the journal; return the journal's rows."""
    done = journal.done()
    todo = [(i, a) for i, a in items if i not in done]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, disable=not progress, file=sys.stderr)
    try:
        if workers <= 1 or len(todo) <= 1:
            for index, arg in todo:
                result, error = worker(arg)
                journal.add(index, result, error)
                bar.update()
        else:
            _run_pool(todo, worker, journal, workers, bar)
    finally:
        bar.close()
    return journal.done()


def _run_pool(todo, worker, journal, workers, bar) -> None:
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads (torch)
    pending, queue = {}, list(reversed(todo))
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        try:
            while queue or pending:
                while queue and len(pending) < 2 * workers:  # bounded: memory stays flat on huge lists
                    index, arg = queue.pop()
                    pending[pool.submit(worker, arg)] = index
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = pending.pop(future)
                    try:
                        result, error = future.result()
                    except BrokenProcessPool as err:  # the pool died, not the item: record nothing
                        raise RuntimeError(f"a worker process died ({err}); re-run to continue, or use --workers 1") from err
                    journal.add(index, result, error)
                    bar.update()
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def split_done(rows: dict[int, dict]) -> tuple[dict[int, dict], dict[int, str]]:
    """Journal rows -> ({index: result}, {index: error})."""
    ok = {i: r for i, r in rows.items() if not r.get(ERROR)}
    bad = {i: r[ERROR] for i, r in rows.items() if r.get(ERROR)}
    return ok, bad


def report_errors(errors: Sequence[tuple[str, str]], errors_path, what: str = "unreadable", limit: int = 10) -> None:
    """Print the failed items (the first `limit`) and where the full list is."""
    if not errors:
        return
    print(f"{len(errors)} {what} file(s), listed with the reason in {errors_path}:", file=sys.stderr)
    for path, reason in errors[:limit]:
        print(f"  {path}: {reason}", file=sys.stderr)
    if len(errors) > limit:
        print(f"  ... and {len(errors) - limit} more", file=sys.stderr)
