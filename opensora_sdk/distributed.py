"""Process groups and the sequence-parallel collectives (spec section 8).

Setup
    `init_from_env()` joins the process group that torchrun / `accelerate launch` describe in
    the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): gloo on the CPU,
    nccl on CUDA, with a finite collective timeout, so a rank whose peer died or stopped
    calling collectives raises `CollectiveError` instead of waiting forever.
    `make_mesh(sp_size)` splits the world into (dp x sp) groups for training: ranks
    [k*sp, (k+1)*sp) form sequence-parallel group k, which sees one batch; ranks with the same
    position in their SP group form a data-parallel group.

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

`vae_decode_split` spreads the VAE's independent temporal chunks over the ranks (sampling).

Communication is counted (bytes each rank sends, ring / pairwise algorithms) while a
`count_communication()` block is open (a module-level list of open counters, empty unless a
benchmark opens one); see benchmarks/bench_distributed.py.
"""

from __future__ import annotations

import os
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


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


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


def make_mesh(sp_size: int, *, timeout_s: float | None = None) -> ParallelMesh:
    """Split the initialised world into (dp x sp) groups; every rank must call this once, in
    the same order relative to other group creations. Without a process group: sp_size 1."""
    if not isinstance(sp_size, int) or isinstance(sp_size, bool) or sp_size < 1:
        raise ValueError(f"sp_size={sp_size!r} must be an integer >= 1")
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
    return ParallelMesh(dp_size, sp_size, dp_rank, sp_rank, dp_group, sp_group)


def sequence_parallel_group(sp_size: int):
    """This rank's SP group of `make_mesh(sp_size)` (the trainer's hook); None for sp_size 1."""
    return make_mesh(sp_size).sp_group


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


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
        dist.all_to_all_single(recv, send, group=group)
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
        dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum x over the ranks and keep this rank's chunk of `dim`."""
    P = group_size(group)
    _check_divisible(x, dim, P, "reduce_scatter")
    parts = [c.contiguous() for c in x.chunk(P, dim)]
    out = torch.empty_like(parts[0])
    _count("reduce_scatter", _nbytes(x) * (P - 1) / P)
    with _collective("reduce_scatter", group):
        dist.reduce_scatter(out, parts, group=group)
    return out


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    P = group_size(group)
    x = x.contiguous()
    _count("all_reduce", _nbytes(x) * 2 * (P - 1) / P)
    with _collective("all_reduce", group):
        dist.all_reduce(x, group=group)
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
        dist.broadcast(x, dist.get_global_rank(group, src_rank_in_group), group=group)
    return x


# --------------------------------------------------------------------------------------------
# VAE decode spread over ranks
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def vae_decode_split(vae, latent: torch.Tensor, num_frames: int, group, **decode_kwargs) -> torch.Tensor:
    """`vae.decode(latent, num_frames)` with its temporal chunks (5 latent -> 17 pixel frames,
    decoded independently) spread round-robin over the ranks of `group` and all-gathered, so
    every rank gets the whole video [B, 3, num_frames, H, W] for about 1/P of the decode time.
    `vae` is a `VideoAutoencoder`; without a group (or micro_frame_size None) a plain decode."""
    mfs = vae.config.micro_frame_size
    if not _active(group) or mfs is None:
        return vae.decode(latent, num_frames, **decode_kwargs)
    P, r = group_size(group), group_rank(group)
    step = vae.latent_size(mfs, None, None)[0]  # latent frames per chunk
    chunks = [(i, k * mfs, min(mfs, num_frames - k * mfs)) for k, i in enumerate(range(0, latent.shape[2], step))]
    B, _, _, h, w = latent.shape
    f, C = vae.spatial_factor, vae.config.vae_2d.out_channels
    out = torch.empty(B, C, num_frames, h * f, w * f, dtype=vae.dtype, device=vae.device)
    for j in range(0, len(chunks), P):  # round j: rank q decodes chunk j + q
        pixels = out.new_zeros(B, C, mfs, h * f, w * f)
        if j + r < len(chunks):
            i, _, n = chunks[j + r]
            pixels[:, :, :n] = vae.decode(latent[:, :, i : i + step], n, **decode_kwargs)
        parts = _gather(pixels[None], 0, group)  # [P, B, C, mfs, H, W]
        for q in range(min(P, len(chunks) - j)):
            _, t0, n = chunks[j + q]
            out[:, :, t0 : t0 + n] = parts[q, :, :, :n]
    return out


__all__ = [
    "CollectiveError",
    "CommCounter",
    "ParallelMesh",
    "ProcessInfo",
    "all_gather",
    "all_to_all",
    "average_gradients",
    "broadcast",
    "count_communication",
    "gather_forward_split_backward",
    "group_rank",
    "group_size",
    "init_from_env",
    "make_mesh",
    "sequence_parallel_group",
    "shutdown",
    "split_forward_gather_backward",
    "vae_decode_split",
]
