"""Failing together: when one rank raises, every rank stops with its error within seconds.

    with fail_together(group):     # on every rank, around work the ranks do together
        video = pipe(...)
        if rank == 0: save(video)

When the block raises on one rank (rank 0 cannot write the file), that rank publishes
"rank, Type: message" in the c10d store (the first failure of the launch wins), waits up to
ACK_TIMEOUT_S for the peers to have read it, and re-raises its own error. Every other rank
inside a block raises `PeerError` (a `CollectiveError`; `.rank`, `.error`) naming it within
about POLL_S: a watchdog thread polls the store and interrupts the guarded thread (an exception
raised at its next Python instruction), and the collectives of `opensora_sdk.collectives` wait
in slices (`wait`), so a rank blocked in one raises too. A rank blocked in a call that cannot be
interrupted (torch.distributed's own collectives, a long kernel) prints the error and exits
with status 1 after `exit_after_s` (default 10 s; None: never). A rank that raised PeerError
ends with status 1 at exit (atexit, os._exit) whatever happens after: a collective it left in
flight would make the interpreter's teardown hang or abort. So the failing rank exits with 1
(its own uncaught error) and so do the others. A block inside an open block is the identity.
After a failure, `opensora_sdk.distributed.shutdown()` does not wait for the others and a new
block raises the first failure at once.

The store keys are per process group ("generation"): `left_process_group()` moves on to the
next one when `shutdown` leaves the group.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from opensora_sdk.process_groups import CollectiveError, group_size, store as _store

POLL_S = 0.1  # how often a guarded rank looks for a peer's failure (watchdog, collective waits)
ACK_TIMEOUT_S = 5.0  # how long a failing rank waits for its peers to have read its error
_GENERATION = 0  # process groups this process has left; keys of the c10d store are per generation
_ABANDONED = False  # a collective was left in flight after a peer failed (see fail_together)
_GUARD: _Guard | None = None  # the open fail_together block of this process (one at a time)


class PeerError(CollectiveError):
    """Another rank raised inside `fail_together`; `rank` and `error` ("Type: message") say which
    and what. Raised on every other rank in its place."""

    rank: int = -1
    error: str = ""


def _peer_error(rank: int, error: str) -> type[PeerError]:
    """A PeerError class whose instances made without arguments carry the message (an exception
    raised in a thread from outside is created from its class, with no arguments)."""
    message = f"rank {rank} failed, so this rank stops too (fail_together): {error}"

    def __init__(self, *args):
        CollectiveError.__init__(self, *(args or (message,)))

    return type("PeerError", (PeerError,), {"rank": rank, "error": error, "__init__": __init__, "__module__": __name__})


def _failure_key() -> str:
    return f"opensora_sdk/{_GENERATION}/failure"


def _failure_record(store=None) -> tuple[int, str] | None:
    """(rank, error) of the first rank that failed inside `fail_together`, or None."""
    try:
        store = _store() if store is None else store
        if not store.check([_failure_key()]):
            return None
        rank, error = store.get(_failure_key()).decode().split("\n", 1)
    except (RuntimeError, OSError):  # no store (not initialised) or its host is gone
        return None
    return int(rank), error


def _interrupt(thread_id: int, exc_class) -> None:
    """Raise `exc_class` in thread `thread_id` at its next Python instruction (None: cancel)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc_class) if exc_class else None
    )


def _exit_after_abandoned_collective() -> None:
    # atexit (before the interpreter's teardown): a collective a failed peer never joined is still
    # running in a gloo worker thread, which can be neither interrupted nor joined; the teardown
    # would wait for it (destroying its group) or abort (when it ends and drops its tensors
    # without the GIL, see shutdown). Flush and end the process now, status 1.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


class _Guard:
    """The state of one `fail_together` block: see there."""

    def __init__(self, size: int, exit_after_s: float | None):
        self.size, self.exit_after_s, self.rank = size, exit_after_s, dist.get_rank()
        self.thread_id = threading.get_ident()
        self.peer: type[PeerError] | None = None
        self.stop = threading.Event()
        self.watchdog = threading.Thread(target=self._watch, name="opensora-fail-together", daemon=True)

    def _watch(self) -> None:
        """Poll the store for a peer's failure; interrupt the guarded thread; exit if it stays stuck."""
        try:
            store = _store().clone()  # its own connection: the guarded thread may use the store too
            store.set_timeout(timedelta(seconds=ACK_TIMEOUT_S))
        except (RuntimeError, OSError):
            return
        while not self.stop.wait(POLL_S):
            record = _failure_record(store)
            if record is None or record[0] == self.rank:
                continue
            self.peer = _peer_error(*record)
            try:
                store.add(f"{_failure_key()}/read", 1)  # tell the failing rank its error arrived
            except (RuntimeError, OSError):
                pass
            if self.stop.is_set():
                return
            _interrupt(self.thread_id, self.peer)  # the guarded thread raises at its next Python instruction
            if self.exit_after_s is None or self.stop.wait(self.exit_after_s):
                return
            # Still inside the block: blocked in a call that cannot be interrupted (a collective this
            # module did not issue, a long C++ kernel) or the error was swallowed. End the process.
            print(f"[rank {self.rank}] {self.peer()}; this rank did not stop within {self.exit_after_s} s "
                  f"(blocked in a call that cannot be interrupted): exiting with status 1", file=sys.stderr, flush=True)  # fmt: skip
            _exit_after_abandoned_collective()

    def wait(self, work) -> None:
        """`work.wait()` in slices of POLL_S, raising the peer's error as soon as one is known."""
        try:
            while self.peer is None:
                try:
                    work.wait(timeout=timedelta(seconds=POLL_S))
                    return
                except RuntimeError as err:
                    if isinstance(err, CollectiveError):
                        raise  # the interrupt
                    if work.is_completed():  # it failed, or it ended just after the slice timed out
                        work.wait()  # its outcome: returns, or raises the collective's error
                        return
        except PeerError:
            pass  # the interrupt, often delivered while handling a slice's timeout: raised below without that context
        raise self.peer() from None  # the work stays in flight (see __exit__)

    def __enter__(self) -> _Guard:
        global _GUARD
        record = _failure_record()
        if record is not None and record[0] != self.rank:
            raise _peer_error(*record)()
        _GUARD = self
        self.watchdog.start()
        return self

    def _close(self) -> None:
        global _GUARD
        self.stop.set()
        self.watchdog.join(timeout=2 * ACK_TIMEOUT_S)
        _interrupt(self.thread_id, None)  # an interrupt not delivered yet is dropped
        _GUARD = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        global _ABANDONED
        try:
            self._close()
        finally:  # an interrupt delivered while closing lands here: close again (once), then it propagates
            self._close()
            if self.peer is not None and not _ABANDONED:
                # A peer failed while this rank was inside: a collective it never joined may still be
                # in flight here (left by `wait`, or by the interrupt), so end the process at exit.
                _ABANDONED = True
                atexit.register(_exit_after_abandoned_collective)
        if exc is None or isinstance(exc, PeerError) or not isinstance(exc, (Exception, KeyboardInterrupt)):
            if exc is None and self.peer is not None:
                raise self.peer()  # this rank finished, a peer did not: the run failed
            return False
        error = f"{type(exc).__name__}: {exc}"[:4000]
        try:  # first failure wins; tell the others and give them a moment to read it
            store = _store()
            rank, first = store.compare_set(_failure_key(), "", f"{self.rank}\n{error}").decode().split("\n", 1)
            if int(rank) != self.rank:  # a peer failed first (this rank's error is probably its consequence)
                raise _peer_error(int(rank), first)() from exc
            deadline = time.monotonic() + ACK_TIMEOUT_S
            while int(store.add(f"{_failure_key()}/read", 0)) < self.size - 1 and time.monotonic() < deadline:
                time.sleep(POLL_S / 4)
        except (RuntimeError, OSError) as err:
            if isinstance(err, PeerError):
                raise
        return False  # this rank's own error propagates


class _Inert:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def fail_together(group=None, *, exit_after_s: float | None = 10.0):
    """`with fail_together(group): ...` around work that the ranks of `group` (None: the world)
    do together (a generation, a generation and its save): when the block raises on one rank,
    every other rank inside a block raises `PeerError` (a `CollectiveError`) naming that rank and
    its error, within about a second, instead of waiting for the collective timeout; see the
    module docstring. Every rank of the group enters it. A block inside an open block is the
    identity (the outer one watches), and so is a group of one rank or no process group."""
    if exit_after_s is not None and not exit_after_s > 0:
        raise ValueError(f"exit_after_s={exit_after_s} must be a number of seconds > 0, or None (never exit)")
    size = group_size(group) if group is not None else dist.get_world_size() if dist.is_initialized() else 1
    if size == 1 or _guard_of_this_thread() is not None:
        return _Inert()
    if _GUARD is not None:
        raise RuntimeError("fail_together: another thread of this process has a block open; one thread at a time")
    return _Guard(size, exit_after_s)


def _guard_of_this_thread() -> _Guard | None:
    guard = _GUARD
    return guard if guard is not None and guard.thread_id == threading.get_ident() else None


def wait(work, group) -> None:
    """Wait for a collective's work; interruptible by a peer's failure inside `fail_together`
    (gloo: NCCL work does not block the CPU, and its wait(timeout) would abort the communicator)."""
    guard = _guard_of_this_thread()
    if guard is None or dist.get_backend(group) != "gloo":
        work.wait()
    else:
        guard.wait(work)


def store_barrier(key: str, timeout_s: float) -> None:
    """Every rank adds 1 to `key` (a name within this process group's keys) and waits until
    all did, a rank failed, or `timeout_s` passed."""
    key = f"opensora_sdk/{_GENERATION}/{key}"
    world = dist.get_world_size()
    deadline = time.monotonic() + timeout_s
    try:
        store = _store()
        store.add(key, 1)
        while int(store.add(key, 0)) < world and _failure_record() is None:
            if time.monotonic() > deadline:
                print(f"[rank {dist.get_rank()}] shutdown: not every rank arrived within {timeout_s} s; leaving anyway",
                      file=sys.stderr, flush=True)  # fmt: skip
                return
            time.sleep(0.02)
    except (RuntimeError, OSError):  # the store's host (rank 0) already left: so did every rank before it
        return


def failed() -> bool:
    """Whether a rank of this process group failed inside a `fail_together` block."""
    return _failure_record() is not None


def abandoned() -> bool:
    """Whether this process left a collective in flight after a peer failed (it ends with status 1)."""
    return _ABANDONED


def left_process_group() -> None:
    """The process group was left: later blocks use the next group's store keys."""
    global _GENERATION
    _GENERATION += 1


__all__ = ["ACK_TIMEOUT_S", "POLL_S", "PeerError", "abandoned", "fail_together", "failed", "left_process_group",
           "store_barrier", "wait"]  # fmt: skip
