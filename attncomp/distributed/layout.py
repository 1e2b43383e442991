"""Sequence shard layouts: which global positions each rank of a group holds.

A layout cuts a sequence of ``L`` positions over ``W`` ranks into equal chunks:

* ``"contiguous"`` — ``W`` chunks; rank ``r`` holds ``[r·L/W, (r+1)·L/W)``.
* ``"zigzag"`` — ``2W`` chunks of ``L/(2W)``; rank ``r`` holds chunks ``r`` and ``2W−1−r``, in that
  order. Under a causal mask every rank then has the same amount of work (an early and a late chunk).

A rank's shard is its chunks concatenated along the sequence axis, so every rank holds ``L/W``
positions. :func:`shard` / :func:`unshard` move between a full tensor and this rank's shard;
:func:`shard_positions` gives the global position ids of a shard (for RoPE and masks).

Gradients follow the sum-over-ranks convention (each rank's loss is a term of one global loss; sum
parameter gradients over the group): ``shard`` is a slice, so its backward pads the gradient with
zeros outside this rank's positions; ``unshard`` is an all-gather, so its backward sums the gradient
over the group and keeps this rank's positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Chunk:
    """A run of ``length`` global positions starting at ``start``, stored at ``local`` in a shard."""

    start: int
    length: int
    local: int

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class ShardLayout:
    """``name`` (one of :data:`LAYOUTS`) over ``world`` ranks for a sequence of ``seq_len`` positions."""

    name: str
    world: int
    seq_len: int

    @property
    def local_len(self) -> int:
        """Positions per rank, ``seq_len / world``."""
        return self.seq_len // self.world

    def chunks(self, rank: int) -> tuple[Chunk, ...]:
        """The chunks rank ``rank`` holds, in shard order."""
        if self.name == "contiguous":
            n = self.local_len
            return (Chunk(rank * n, n, 0),)
        c = self.seq_len // (2 * self.world)
        return (Chunk(rank * c, c, 0), Chunk((2 * self.world - 1 - rank) * c, c, c))


def check_layout_name(layout: str) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


@lru_cache(maxsize=256)
def _layout(name: str, world: int, seq_len: int) -> ShardLayout:
    return ShardLayout(name, world, seq_len)


def make_layout(layout: str, world: int, seq_len: int, *, what: str = "sequence length") -> ShardLayout:
    """The layout ``layout`` of a ``seq_len``-long sequence over ``world`` ranks; ``ValueError`` when
    the length does not divide into its chunks (``world`` for contiguous, ``2·world`` for zigzag)."""
    check_layout_name(layout)
    parts = world if layout == "contiguous" else 2 * world
    if seq_len % parts or seq_len <= 0:
        raise ValueError(f"{what} {seq_len} must be a positive multiple of {parts} for layout {layout!r} over "
                         f"{world} ranks ({'world' if layout == 'contiguous' else '2 x world'} equal chunks)")
    return _layout(layout, world, seq_len)


def group_info(group=None) -> tuple[int, int]:
    """``(world size, this rank's rank in group)``; ``(1, 0)`` when torch.distributed is not initialised
    and no group is given (a single process)."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        return 1, 0
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("this process is not a member of the given process group")
    return dist.get_world_size(group), rank


def global_rank(group, rank: int) -> int:
    """The global rank of ``rank`` (a rank inside ``group``)."""
    return rank if group is None or group is dist.group.WORLD else dist.get_global_rank(group, rank)


def _dim(x: Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def _take(x: Tensor, dim: int, lay: ShardLayout, rank: int) -> Tensor:
    parts = [x.narrow(dim, c.start, c.length) for c in lay.chunks(rank)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _place(shards: list[Tensor], dim: int, lay: ShardLayout) -> Tensor:
    """Global tensor from every rank's shard (``shards[r]`` is rank r's)."""
    pieces = []
    for r, s in enumerate(shards):
        for c in lay.chunks(r):
            pieces.append((c.start, s.narrow(dim, c.local, c.length)))
    return torch.cat([p for _, p in sorted(pieces, key=lambda t: t[0])], dim)


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, lay, rank):
        ctx.dim, ctx.lay, ctx.rank, ctx.shape = dim, lay, rank, x.shape
        return _take(x, dim, lay, rank).contiguous()

    @staticmethod
    def backward(ctx, g):
        full = g.new_zeros(ctx.shape)
        for c in ctx.lay.chunks(ctx.rank):
            full.narrow(ctx.dim, c.start, c.length).copy_(g.narrow(ctx.dim, c.local, c.length))
        return full, None, None, None


def _all_gather(x: Tensor, world: int, group) -> list[Tensor]:
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x, group=group)
    return out


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, lay, rank, group):
        ctx.dim, ctx.lay, ctx.rank, ctx.group = dim, lay, rank, group
        if lay.world == 1:
            return x.clone()
        return _place(_all_gather(x, lay.world, group), dim, lay)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        if ctx.lay.world > 1:
            dist.all_reduce(g, group=ctx.group)
        return _take(g, ctx.dim, ctx.lay, ctx.rank).contiguous(), None, None, None, None


def shard(x: Tensor, dim: int, layout: str = "contiguous", group=None) -> Tensor:
    """This rank's shard of ``x`` along ``dim``.

    x: the full tensor, the same on every rank of ``group``, with ``L`` positions on ``dim`` (``L`` a
    multiple of ``W`` for contiguous, ``2W`` for zigzag). Returns a contiguous tensor of x's shape with
    ``L/W`` on ``dim`` and x's dtype. Differentiable (the gradient is zero outside this rank's positions).
    """
    world, rank = group_info(group)
    dim = _dim(x, dim)
    lay = make_layout(layout, world, x.shape[dim], what=f"shard: length {x.shape[dim]} of dim {dim}, i.e.")
    return _Shard.apply(x, dim, lay, rank)


def unshard(x: Tensor, dim: int, layout: str = "contiguous", group=None) -> Tensor:
    """The full tensor from every rank's shard (an all-gather over ``group``, then the layout's order).

    x: this rank's shard, ``L/W`` positions on ``dim`` (the same shape on every rank). Returns the
    full tensor, ``L`` positions on ``dim``, the same on every rank. Differentiable (backward: the
    gradient summed over the group, this rank's positions kept).
    """
    world, rank = group_info(group)
    dim = _dim(x, dim)
    lay = make_layout(layout, world, x.shape[dim] * world, what="unshard: global length")
    return _Unshard.apply(x, dim, lay, rank, group)


def shard_positions(local_len: int, layout: str = "contiguous", group=None, device=None) -> Tensor:
    """Global position ids ``(local_len,)`` int64 of this rank's shard (RoPE, position embeddings)."""
    world, rank = group_info(group)
    lay = make_layout(layout, world, local_len * world, what="global length")
    return torch.cat([torch.arange(c.start, c.stop, device=device) for c in lay.chunks(rank)])
