"""The sequence-parallel collectives, with autograd (spec section 8).

Each is the identity when `group` is None or has one rank; no global process group is used
anywhere: the group is always an argument.

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
    broadcast(x, group, src_rank_in_group), average_gradients(parameters, group)
    barrier(group)
        wait until every rank of the group got here (interruptible inside `fail_together`,
        unlike torch.distributed.barrier).

Gradient scaling as in the official scheme: with tokens split "down" and gathered "up", the
parameter gradients of the ranks of an SP group *average* to the single-process gradient, so
a data-parallel average over all ranks (DDP, FSDP) is right as it is; without DDP, call
`average_gradients(params, sp_group)`.

Inside a `fail_together` block each collective waits in slices (`fail_together.wait`), so a
peer's failure interrupts it. A backend failure (a peer gone, the timeout) is a
`CollectiveError` that says what probably happened.

Communication is counted (bytes each rank sends, ring / pairwise algorithms) while a
`count_communication()` block is open (a module-level list of open counters, empty unless a
benchmark opens one); see benchmarks/bench_distributed.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from opensora_sdk.fail_together import wait as _wait
from opensora_sdk.process_groups import TIMEOUT_ENV, CollectiveError, group_rank, group_size

GRAD_SCALES = (None, "down", "up")

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


@torch.no_grad()
def barrier(group) -> None:
    """Wait until every rank of `group` got here (the identity without a group); interruptible
    inside `fail_together`, unlike torch.distributed.barrier."""
    if not _active(group):
        return
    with _collective("barrier", group):
        _wait(dist.barrier(group=group, async_op=True), group)


__all__ = [
    "CommCounter",
    "all_gather",
    "all_to_all",
    "average_gradients",
    "barrier",
    "broadcast",
    "count_communication",
    "gather_forward_split_backward",
    "split_forward_gather_backward",
]
