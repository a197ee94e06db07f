"""Several processes working on one generation or one training run (spec section 8).

The parts, each in its own module, all reachable from here:

    opensora_sdk.process_groups   init_from_env (join the launch's group), make_mesh (dp x sp
                                  groups, made once), sequence_parallel_group, group_size/rank,
                                  ProcessInfo, ParallelMesh, CollectiveError
    opensora_sdk.fail_together    fail_together (one rank raises: all stop with its error
                                  within seconds), PeerError
    opensora_sdk.collectives      all_to_all, split/gather with autograd, all_gather,
                                  broadcast, average_gradients, barrier, count_communication

and, here, `shutdown()`: every rank calls it at the end; it waits (bounded) for all ranks,
then destroys every group while the interpreter is alive (see the comment there: an exit with
live groups can abort with SIGABRT).

The VAE decode spread over the ranks (`vae_decode_split`) lives next to the VAE, in
opensora_sdk/models/vae_parallel.py.
"""

from __future__ import annotations

import gc

import torch.distributed as dist

from opensora_sdk import fail_together as _fail_together
from opensora_sdk import process_groups as _process_groups
from opensora_sdk.collectives import (
    CommCounter,
    all_gather,
    all_to_all,
    average_gradients,
    barrier,
    broadcast,
    count_communication,
    gather_forward_split_backward,
    split_forward_gather_backward,
)
from opensora_sdk.fail_together import PeerError, fail_together
from opensora_sdk.process_groups import (
    CollectiveError,
    ParallelMesh,
    ProcessInfo,
    group_rank,
    group_size,
    init_from_env,
    make_mesh,
    sequence_parallel_group,
    timeout_seconds,
)


def shutdown(timeout_s: float = 60.0) -> None:
    """Leave the process group (if one was joined); every rank calls it at the end.

    Waits (at most `timeout_s`, through the c10d store, not a collective) until every rank got
    here, then destroys every group, subgroups before the world group, and collects them, so
    their communication threads end now rather than during the interpreter's exit. No wait after
    a rank failed inside `fail_together` (the others may never arrive). A process that gave up
    on a collective still in flight (`fail_together`) keeps its groups: it ends with status 1 at
    exit, see `fail_together`.
    """
    _process_groups.clear_meshes()
    if not dist.is_initialized() or _fail_together.abandoned():
        return
    if dist.get_world_size() > 1 and not _fail_together.failed():
        _fail_together.store_barrier("shutdown", timeout_s)
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
    _fail_together.left_process_group()


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
    "timeout_seconds",
]
