"""Process groups and the sequence-parallel collectives (spec section 8).

Setup
    `init_from_env()` joins the process group that torchrun / `accelerate launch` describe in
    the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): gloo on the CPU,
    nccl on CUDA, with a finite collective timeout, so a rank whose peer died or stopped
    calling collectives raises `CollectiveError` instead of waiting forever.
    `make_mesh(sp_size)` splits the world into (dp x sp) groups for training: ranks
    [k*sp, (k+1)*sp) form sequence-parallel group k, which sees one batch; ranks with the same
    position in their SP group form a data-parallel group. The groups are made once per process
    group; later calls return the same mesh.
    `shutdown()` at the end, on every rank: waits (bounded) for all ranks, then destroys every
    group while the interpreter is alive (see the comment there: an exit with live groups can
    abort with SIGABRT).

Failing together
    with fail_together(group):     # on every rank, around work the ranks do together
        video = pipe(...)
        if rank == 0: save(video)
    When the block raises on one rank (rank 0 cannot write the file), that rank publishes
    "rank, Type: message" in the c10d store (the first failure of the launch wins), waits up to
    ACK_TIMEOUT_S for the peers to have read it, and re-raises its own error. Every other rank
    inside a block raises `PeerError` (a `CollectiveError`; `.rank`, `.error`) naming it within
    about POLL_S: a watchdog thread polls the store and interrupts the guarded thread (an
    exception raised at its next Python instruction), and the collectives of this module and
    `barrier` wait in slices, so a rank blocked in one raises too. A rank blocked in a call that
    cannot be interrupted (torch.distributed's own collectives, a long kernel) prints the error
    and exits with status 1 after `exit_after_s` (default 10 s; None: never). A rank that raised
    PeerError ends with status 1 at exit (atexit, os._exit) whatever happens after: a collective
    it left in flight would make the interpreter's teardown hang or abort. So the failing rank
    exits with 1 (its own uncaught error) and so do the others. A block inside an open block is
    the identity. After a failure, `shutdown()` does not wait for the others and a new block
    raises the first failure at once.

Collectives (all the identity when `group` is None or has one rank; no global process group
is used anywhere: the group is always an argument)
    all_to_all(x, group, scatter_dim, gather_dim)
        x [.., X_s, .., X_g, ..] -> [.., X_s/P, .., X_g*P, ..]: chunk i of `scatter_dim` goes
        to rank i; the chunks received are concatenated in rank order along `gather_dim`.
        Backward: the inverse all-to-all.
    split_forward_gather_backward(x, dim, group, grad_scale)
        x [.., X, ..] (the same on every rank) -> this rank's chunk [.., X/P, ..].
        Backward: all-gather of the chunk gradients, then "down" (/P), "up" (*P) or None.
    gather_forward_split_backward(x, dim, group, grad_scale)
        chunk [.., X/P, ..] -> [.., X, ..] on every rank. Backward: this rank's chunk of the
        gradient, scaled "up" (*P), "down" (/P) or not.
    all_gather(x, dim, group)
        like gather, but for a tensor that every rank uses differently (keys and values of the
        K/V fallback): backward sums the gradients over the ranks (reduce-scatter).

Gradient scaling as in the official scheme: with tokens split "down" and gathered "up", the
parameter gradients of the ranks of an SP group *average* to the single-process gradient, so
a data-parallel average over all ranks (DDP, FSDP) is right as it is; without DDP, call
`average_gradients(params, sp_group)`.

The VAE decode spread over the ranks (`vae_decode_split`) lives next to the VAE, in
opensora_sdk/models/vae_parallel.py.

Communication is counted (bytes each rank sends, ring / pairwise algorithms) while a
`count_communication()` block is open (a module-level list of open counters, empty unless a
benchmark opens one); see benchmarks/bench_distributed.py.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "OPENSORA_DIST_TIMEOUT_S"
GRAD_SCALES = (None, "down", "up")


class CollectiveError(RuntimeError):
    """A collective failed on this rank: a peer raised and exited, or stopped calling collectives."""


# --------------------------------------------------------------------------------------------
# Process-group setup
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    """This process in a launch: rank / world size / local rank, its device, the world group
    (None when alone: every collective is then the identity)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(environ, name: str, default: int | None = None, minimum: int = 0) -> int:
    raw = environ.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set; launch with torchrun or accelerate launch")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer >= {minimum}") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={value} must be an integer >= {minimum}")
    return value


def timeout_seconds(timeout_s: float | None = None) -> float:
    """`timeout_s`, else $OPENSORA_DIST_TIMEOUT_S, else 600 s (a positive number)."""
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV)
        try:
            timeout_s = float(raw) if raw is not None else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"environment variable {TIMEOUT_ENV}={raw!r} must be a number of seconds > 0") from None
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s} must be a number of seconds > 0")
    return float(timeout_s)


def init_from_env(
    backend: str | None = None, *, timeout_s: float | None = None, environ=None
) -> ProcessInfo:
    """Join the launch's process group (or reuse one accelerate already made).

    WORLD_SIZE unset or 1: a single process, nothing initialised, `group` None. Otherwise
    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are required (LOCAL_RANK defaults to RANK);
    `backend` defaults to "nccl" with CUDA and "gloo" without; the CUDA device is
    cuda:LOCAL_RANK. Collectives time out after `timeout_s` (default $OPENSORA_DIST_TIMEOUT_S
    or 600 s).
    """
    environ = os.environ if environ is None else environ
    world = _env_int(environ, "WORLD_SIZE", default=1, minimum=1)
    cuda = torch.cuda.is_available()
    if world == 1 and not dist.is_initialized():
        return ProcessInfo(device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    rank = _env_int(environ, "RANK", default=dist.get_rank() if dist.is_initialized() else None)
    if rank >= world:
        raise ValueError(f"environment variable RANK={rank} must be < WORLD_SIZE={world}")
    local_rank = _env_int(environ, "LOCAL_RANK", default=rank)
    device = torch.device("cpu")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = backend or ("nccl" if cuda else "gloo")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend={backend!r} is not supported; use 'gloo' (CPU) or 'nccl' (CUDA)")
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in environ:
                raise ValueError(f"environment variable {name} is not set; launch with torchrun or accelerate launch")
        if backend == "nccl":  # abort (raise) on a timed-out collective instead of hanging
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(
            backend, init_method=f"tcp://{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}",
            rank=rank, world_size=world, timeout=timedelta(seconds=timeout_seconds(timeout_s)),
        )  # fmt: skip
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise ValueError(
            f"the process group already initialised has rank {dist.get_rank()} of {dist.get_world_size()}, "
            f"but the environment says RANK={rank}, WORLD_SIZE={world}"
        )
    return ProcessInfo(rank, world, local_rank, device, dist.group.WORLD)




@dataclass(frozen=True)
class ParallelMesh:
    """A (dp x sp) split of the world. `sp_group` holds this rank's sequence-parallel peers
    (ranks dp_rank*sp_size .. +sp_size-1, which see the same batch); `dp_group` the ranks
    holding the same shard position in the other SP groups. Groups are None when size 1."""

    dp_size: int
    sp_size: int
    dp_rank: int
    sp_rank: int
    dp_group: object | None = None
    sp_group: object | None = None


_MESHES: dict[int, tuple[object, ParallelMesh]] = {}  # sp_size -> (world group, its mesh); shutdown() clears


def make_mesh(sp_size: int, *, timeout_s: float | None = None) -> ParallelMesh:
    """Split the initialised world into (dp x sp) groups. The groups are made once per process
    group: every rank's first call for an sp_size creates them (all ranks must make it, in the
    same order relative to other group creations; `timeout_s` applies then) and later calls
    return the same mesh, groups included. Without a process group: sp_size 1, no groups."""
    if not isinstance(sp_size, int) or isinstance(sp_size, bool) or sp_size < 1:
        raise ValueError(f"sp_size={sp_size!r} must be an integer >= 1")
    world_group = dist.group.WORLD if dist.is_initialized() else None
    cached = _MESHES.get(sp_size)
    if cached is not None and cached[0] is world_group:  # the same process group as when it was made
        return cached[1]
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if world % sp_size:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(f"sp_size={sp_size} must divide the number of processes ({world}); allowed: {divisors}")
    dp_size = world // sp_size
    dp_rank, sp_rank = divmod(rank, sp_size)
    sp_group = dp_group = None
    timeout = timedelta(seconds=timeout_seconds(timeout_s))
    if sp_size > 1:
        for k in range(dp_size):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(k * sp_size, (k + 1) * sp_size)), timeout=timeout)
            sp_group = group if k == dp_rank else sp_group
    if dp_size > 1 and sp_size > 1:
        for j in range(sp_size):
            group = dist.new_group(list(range(j, world, sp_size)), timeout=timeout)
            dp_group = group if j == sp_rank else dp_group
    elif dp_size > 1:
        dp_group = dist.group.WORLD
    mesh = ParallelMesh(dp_size, sp_size, dp_rank, sp_rank, dp_group, sp_group)
    _MESHES[sp_size] = (world_group, mesh)
    return mesh


def sequence_parallel_group(sp_size: int):
    """This rank's SP group of `make_mesh(sp_size)` (made once, see there); None for sp_size 1."""
    return make_mesh(sp_size).sp_group


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def shutdown(timeout_s: float = 60.0) -> None:
    """Leave the process group (if one was joined); every rank calls it at the end.

    Waits (at most `timeout_s`, through the c10d store, not a collective) until every rank got
    here, then destroys every group, subgroups before the world group, and collects them, so
    their communication threads end now rather than during the interpreter's exit. No wait after
    a rank failed inside `fail_together` (the others may never arrive). A process that gave up
    on a collective still in flight (`fail_together`) keeps its groups: it ends with status 1 at
    exit, see `fail_together`.
    """
    global _GENERATION
    _MESHES.clear()
    if not dist.is_initialized() or _ABANDONED:
        return
    if dist.get_world_size() > 1 and _failure_record() is None:
        _store_barrier(f"opensora_sdk/{_GENERATION}/shutdown", timeout_s)
    # Why the wait and the destroy (the SIGABRT at exit of 2-process runs): a gloo collective
    # completes in a worker thread of its process group, which drops its last references to the
    # work, and so to the work's tensors, only after the caller's wait() has returned. Dropping a
    # tensor that has a Python object needs the GIL; once the main thread has returned and the
    # interpreter is finalising, a thread asking for the GIL is ended by pthread_exit, whose
    # unwinding through that C++ destructor calls std::terminate: "terminate called without an
    # active exception", SIGABRT. A rank that leaves right after its last collective (the trainer's
    # final gather; the faster rank) loses that race now and then, more often on a busy CPU; a
    # peer exiting while this rank's collective is still in flight makes a failed work finish the
    # same way. Waiting for every rank, then destroying the groups while the interpreter is alive
    # (the destructor joins the worker threads, the GIL released) closes both windows.
    dist.destroy_process_group()  # every group: torch shuts subgroups down first, then the world group
    gc.collect()  # groups held only by reference cycles are destroyed now, not at interpreter exit
    _GENERATION += 1


def _store():
    return dist.distributed_c10d._get_default_store()


def _store_barrier(key: str, timeout_s: float) -> None:
    """Every rank adds 1 to `key` and waits until all did, a rank failed, or `timeout_s` passed."""
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


# --------------------------------------------------------------------------------------------
# Failing together
# --------------------------------------------------------------------------------------------

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
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_class) if exc_class else None)


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


def _wait(work, group) -> None:
    """Wait for a collective's work; interruptible by a peer's failure inside `fail_together`
    (gloo: NCCL work does not block the CPU, and its wait(timeout) would abort the communicator)."""
    guard = _guard_of_this_thread()
    if guard is None or dist.get_backend(group) != "gloo":
        work.wait()
    else:
        guard.wait(work)


@torch.no_grad()
def barrier(group) -> None:
    """Wait until every rank of `group` got here (the identity without a group); interruptible
    inside `fail_together`, unlike torch.distributed.barrier."""
    if not _active(group):
        return
    with _collective("barrier", group):
        _wait(dist.barrier(group=group, async_op=True), group)


# --------------------------------------------------------------------------------------------
# Communication accounting
# --------------------------------------------------------------------------------------------


@dataclass
class CommCounter:
    """Bytes this rank sent, per collective name ("all_to_all", "all_gather", ...), and calls."""

    bytes: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, op: str, nbytes: float) -> None:
        self.bytes[op] = self.bytes.get(op, 0) + int(nbytes)
        self.calls[op] = self.calls.get(op, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


_COUNTERS: list[CommCounter] = []  # open `count_communication` blocks (instrumentation only)


@contextmanager
def count_communication():
    """`with count_communication() as c: ...` -> c.bytes, c.calls of the collectives run
    in the block, forward and backward (bytes sent by this rank)."""
    counter = CommCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _count(op: str, nbytes: float) -> None:
    for counter in _COUNTERS:
        counter.add(op, nbytes)


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


@contextmanager
def _collective(op: str, group):
    """Turn a backend failure (peer gone, timeout) into a CollectiveError that says so."""
    try:
        yield
    except Exception as err:  # gloo / nccl raise RuntimeError subclasses (DistBackendError, ...)
        if isinstance(err, CollectiveError):
            raise
        raise CollectiveError(
            f"{op} over {group_size(group)} ranks failed on rank {dist.get_rank()}: a peer process probably "
            f"raised (see its error above) or stopped calling collectives, and this rank gave up after the "
            f"collective timeout ({TIMEOUT_ENV} / init_from_env(timeout_s=...)) or a closed connection. "
            f"Backend error: {err}"
        ) from err


# --------------------------------------------------------------------------------------------
# Raw collectives (no autograd)
# --------------------------------------------------------------------------------------------


def _check_divisible(x: torch.Tensor, dim: int, P: int, op: str) -> None:
    if x.shape[dim] % P:
        raise ValueError(
            f"{op}: dimension {dim} of shape {tuple(x.shape)} has size {x.shape[dim]}, which must be divisible "
            f"by the group size {P} (pad it first)"
        )


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    P = group_size(group)
    scatter_dim, gather_dim = scatter_dim % x.ndim, gather_dim % x.ndim
    _check_divisible(x, scatter_dim, P, "all_to_all")
    send = x.movedim(scatter_dim, 0)  # [X_s, ...]
    send = send.reshape(P, send.shape[0] // P, *send.shape[1:]).contiguous()  # [P, X_s/P, ...]: row i -> rank i
    recv = torch.empty_like(send)  # row r <- rank r
    _count("all_to_all", _nbytes(send) * (P - 1) / P)
    with _collective("all_to_all", group):
        _wait(dist.all_to_all_single(recv, send, group=group, async_op=True), group)
    recv = recv.movedim(1, scatter_dim + 1)  # [P, *x.shape with X_s/P]
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)  # rank-major along gather_dim


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    P = group_size(group)
    _check_divisible(x, dim, P, "split")
    return x.chunk(P, dim)[group_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    P = group_size(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(P)]
    _count("all_gather", _nbytes(x) * (P - 1))
    with _collective("all_gather", group):
        _wait(dist.all_gather(parts, x, group=group, async_op=True), group)
    return torch.cat(parts, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum x over the ranks and keep this rank's chunk of `dim`."""
    P = group_size(group)
    _check_divisible(x, dim, P, "reduce_scatter")
    parts = [c.contiguous() for c in x.chunk(P, dim)]
    out = torch.empty_like(parts[0])
    _count("reduce_scatter", _nbytes(x) * (P - 1) / P)
    with _collective("reduce_scatter", group):
        _wait(dist.reduce_scatter(out, parts, group=group, async_op=True), group)
    return out


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    P = group_size(group)
    x = x.contiguous()
    _count("all_reduce", _nbytes(x) * 2 * (P - 1) / P)
    with _collective("all_reduce", group):
        _wait(dist.all_reduce(x, group=group, async_op=True), group)
    return x


def _scale(x: torch.Tensor, grad_scale: str | None, P: int) -> torch.Tensor:
    if grad_scale == "down":
        return x / P
    if grad_scale == "up":
        return x * P
    return x


def _check_scale(grad_scale) -> None:
    if grad_scale not in GRAD_SCALES:
        raise ValueError(f"grad_scale={grad_scale!r} is not allowed; choose one of {list(GRAD_SCALES)}")


# --------------------------------------------------------------------------------------------
# Autograd collectives
# --------------------------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim % x.ndim, gather_dim % x.ndim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


class _SplitForwardGatherBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, grad_scale):
        ctx.dim, ctx.group, ctx.grad_scale = dim, group, grad_scale
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        grad = _gather(grad, ctx.dim, ctx.group)
        return _scale(grad, ctx.grad_scale, group_size(ctx.group)), None, None, None


class _GatherForwardSplitBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, grad_scale):
        ctx.dim, ctx.group, ctx.grad_scale = dim, group, grad_scale
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        grad = _split(grad, ctx.dim, ctx.group)
        return _scale(grad, ctx.grad_scale, group_size(ctx.group)), None, None, None


class _AllGatherSumBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):  # reduce-scatter: sum over ranks, keep this rank's chunk
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


def _active(group) -> bool:
    return group is not None and group_size(group) > 1


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Scatter `scatter_dim` over the ranks, gather `gather_dim` (see the module docstring)."""
    return _AllToAll.apply(x, group, scatter_dim, gather_dim) if _active(group) else x


def split_forward_gather_backward(x: torch.Tensor, dim: int, group, grad_scale: str | None = "down") -> torch.Tensor:
    """This rank's chunk of `dim` (divisible by the group size); backward gathers and scales."""
    _check_scale(grad_scale)
    return _SplitForwardGatherBackward.apply(x, dim, group, grad_scale) if _active(group) else x


def gather_forward_split_backward(x: torch.Tensor, dim: int, group, grad_scale: str | None = "up") -> torch.Tensor:
    """Concatenate every rank's chunk along `dim`; backward keeps this rank's chunk, scaled."""
    _check_scale(grad_scale)
    return _GatherForwardSplitBackward.apply(x, dim, group, grad_scale) if _active(group) else x


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's chunk along `dim`; backward sums the gradients over the ranks."""
    return _AllGatherSumBackward.apply(x, dim, group) if _active(group) else x


@torch.no_grad()
def average_gradients(parameters, group) -> None:
    """Average `.grad` over `group` in place (what DDP does; for SP runs without DDP)."""
    if not _active(group):
        return
    P = group_size(group)
    for p in parameters:
        if p.grad is not None:
            p.grad.copy_(_all_reduce(p.grad.clone(), group) / P)


@torch.no_grad()
def broadcast(x: torch.Tensor, group, src_rank_in_group: int = 0) -> torch.Tensor:
    """`x` of the group's rank `src_rank_in_group` on every rank (in place; returns x)."""
    if not _active(group):
        return x
    _count("broadcast", _nbytes(x) if group_rank(group) == src_rank_in_group else 0)
    with _collective("broadcast", group):
        _wait(dist.broadcast(x, dist.get_global_rank(group, src_rank_in_group), group=group, async_op=True), group)
    return x


__all__ = [
    "CollectiveError",
    "CommCounter",
    "ParallelMesh",
    "PeerError",
    "ProcessInfo",
    "all_gather",
    "all_to_all",
    "average_gradients",
    "barrier",
    "broadcast",
    "count_communication",
    "fail_together",
    "gather_forward_split_backward",
    "group_rank",
    "group_size",
    "init_from_env",
    "make_mesh",
    "sequence_parallel_group",
    "shutdown",
    "split_forward_gather_backward",
]
