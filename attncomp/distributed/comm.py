"""Point-to-point messages of the ring (``dist.isend`` / ``dist.irecv``) and their accounting.

Key/value rows travel as one flat buffer (k's rows then v's, :func:`pack` / :func:`unpack`). Tags:
``shift`` for key/value rows, ``W + shift`` for their gradients (gloo matches by tag; NCCL ignores
tags and matches a pair's messages in posting order, which the ring keeps identical on both sides).
When a rank sends to and receives from the same peer in one step, the lower rank sends first.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import global_rank

# ---------------------------------------------------------------------------------------------
# Traffic accounting (tests and benchmarks): bytes sent and block calls, per phase.
# ---------------------------------------------------------------------------------------------


@dataclass
class Traffic:
    """What this rank sent and computed inside a :func:`traffic` block. ``sent``: one record per
    message, ``(phase, kind, shift, peer, bytes)`` with phase ``"fwd"`` / ``"bwd"`` and kind ``"kv"`` /
    ``"dkv"``; ``calls``: ``(phase, shift, rows, cols, masked)`` per block call."""

    sent: list = field(default_factory=list)
    calls: list = field(default_factory=list)

    def bytes_sent(self, phase: str | None = None) -> int:
        return sum(b for p, _, _, _, b in self.sent if phase in (None, p))

    def peers(self, phase: str | None = None) -> set[int]:
        return {peer for p, _, _, peer, _ in self.sent if phase in (None, p)}

    def score_elements(self, phase: str | None = None) -> int:
        return sum(m * n for p, _, m, n, _ in self.calls if phase in (None, p))


_TRAFFIC: list[Traffic] = []


@contextlib.contextmanager
def traffic():
    """Record this rank's ring messages and block calls: ``with traffic() as t: ...; t.bytes_sent()``."""
    t = Traffic()
    _TRAFFIC.append(t)
    try:
        yield t
    finally:
        _TRAFFIC.remove(t)


def note_send(phase, kind, shift, peer, nbytes):
    for t in _TRAFFIC:
        t.sent.append((phase, kind, shift, peer, nbytes))


def note_call(phase, shift, m, n, masked):
    for t in _TRAFFIC:
        t.calls.append((phase, shift, m, n, masked))


# ---------------------------------------------------------------------------------------------
# Point-to-point exchange
# ---------------------------------------------------------------------------------------------


class Exchange:
    """The sends and receives this rank posts in one step (a send and/or a receive)."""

    def __init__(self, group, rank: int, phase: str, kind: str, shift: int, tag: int):
        self.group, self.rank, self.phase, self.kind, self.shift, self.tag = group, rank, phase, kind, shift, tag
        self.send_work = self.recv_work = None
        self.send_buf = self.recv_buf = None

    def post(self, send: tuple[int, Tensor] | None, recv: tuple[int, Tensor] | None) -> Exchange:
        ops = []
        if send is not None:
            ops.append(("send", *send))
        if recv is not None:
            ops.append(("recv", *recv))
        if len(ops) == 2 and send[0] == recv[0] and self.rank > send[0]:
            ops.reverse()  # same peer both ways: the lower rank sends first
        for op, peer, buf in ops:
            g = global_rank(self.group, peer)
            if op == "send":
                self.send_buf = buf
                self.send_work = dist.isend(buf, g, group=self.group, tag=self.tag)
                note_send(self.phase, self.kind, self.shift, peer, buf.numel() * buf.element_size())
            else:
                self.recv_buf = buf
                self.recv_work = dist.irecv(buf, g, group=self.group, tag=self.tag)
        return self

    def wait_recv(self) -> Tensor | None:
        if self.recv_work is not None:
            self.recv_work.wait()
            self.recv_work = None
        return self.recv_buf

    def wait_send(self) -> None:
        if self.send_work is not None:
            self.send_work.wait()
            self.send_work = None
        self.send_buf = None


def pack(k: Tensor, v: Tensor, rows: tuple[int, int], dtype=None) -> Tensor:
    """k ``(B, H, L, D)`` and v ``(B, H, L, Dv)`` rows ``[a, b)`` as one flat contiguous buffer."""
    a, b = rows
    parts = [k[:, :, a:b].reshape(-1), v[:, :, a:b].reshape(-1)]
    return torch.cat(parts if dtype is None else [p.to(dtype) for p in parts])


def unpack(buf: Tensor, k: Tensor, v: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Views ``(B, H, n, D)`` / ``(B, H, n, Dv)`` of a buffer made by :func:`pack` (shapes from k, v)."""
    B, H, _, D = k.shape
    Dv = v.shape[-1]
    return buf[:B * H * n * D].view(B, H, n, D), buf[B * H * n * D:].view(B, H, n, Dv)


def recv_buffer(k: Tensor, v: Tensor, rows: tuple[int, int], dtype) -> Tensor:
    """An empty flat buffer for rows ``[a, b)`` of k and v (as :func:`pack` makes them) in ``dtype``."""
    B, H, _, D = k.shape
    return torch.empty(B * H * (rows[1] - rows[0]) * (D + v.shape[-1]), dtype=dtype, device=k.device)
