"""Joining a launch's process group and splitting it for sequence parallelism (spec section 8).

    `init_from_env()` joins the process group that torchrun / `accelerate launch` describe in
    the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): gloo on the CPU,
    nccl on CUDA, with a finite collective timeout, so a rank whose peer died or stopped
    calling collectives raises `CollectiveError` instead of waiting forever.
    `make_mesh(sp_size)` splits the world into (dp x sp) groups for training: ranks
    [k*sp, (k+1)*sp) form sequence-parallel group k, which sees one batch; ranks with the same
    position in their SP group form a data-parallel group. The groups are made once per process
    group; later calls return the same mesh.

Leaving the group is `opensora_sdk.distributed.shutdown` (it needs the failing-together state).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "OPENSORA_DIST_TIMEOUT_S"


class CollectiveError(RuntimeError):
    """A collective failed on this rank: a peer raised and exited, or stopped calling collectives."""


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


def init_from_env(backend: str | None = None, *, timeout_s: float | None = None, environ=None) -> ProcessInfo:
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


def clear_meshes() -> None:
    """Forget the meshes made so far (the process group they belong to is being left)."""
    _MESHES.clear()


def store():
    """The c10d store of the default process group (raises RuntimeError when there is none)."""
    return dist.distributed_c10d._get_default_store()

__all__ = ["CollectiveError", "ParallelMesh", "ProcessInfo", "clear_meshes", "group_rank", "group_size", "init_from_env",
           "make_mesh", "sequence_parallel_group", "store", "timeout_seconds"]  # fmt: skip
