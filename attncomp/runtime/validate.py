"""Input checks shared by the public entry points (``attncomp.ops``, the custom ops).

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
device or value) with a message that names the argument, says what was expected and shows what
was given, e.g.::

    ValueError: q and k must have the same head dim (last axis): q is (2, 4, 128, 64), k is (2, 4, 128, 32)

What is *not* an error (see README, "Reliability"):

* non-contiguous, transposed and expanded (stride-0) inputs — every executor reads strides;
* zero-size inputs: ``B``, ``H`` or ``Lq`` = 0 give an empty output; ``Lk`` = 0 (nothing to attend
  to) gives zeros, like a fully masked row, with ``lse = -inf`` (:func:`is_empty`);
* NaN / Inf values: they propagate as they would through the eager computation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attncomp.runtime.device import use_triton

__all__ = ["FLOAT_DTYPES", "MAX_HEAD_DIM", "check_additive", "check_keep", "check_qkv", "check_scale",
           "check_softcap", "check_tensor", "empty_result", "is_empty", "shape"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256  # the largest q·k / v head dim of the Triton kernels (BLOCK_D tiles in registers)


def shape(x: Tensor) -> tuple[int, ...]:
    """``x.shape`` as a plain tuple, for messages."""
    return tuple(x.shape)


def check_tensor(x, name: str) -> Tensor:
    """``x`` must be a ``torch.Tensor``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_float(x: Tensor, name: str, prefix: str = "") -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{prefix}{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {x.dtype}; convert it first, e.g. {name}.float()")


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, name_prefix: str = "", gqa: bool = True,
              same_length: bool = False, kernel_limit: bool | None = None) -> tuple[int, int, int, int, int, int, int]:
    """Check attention inputs q ``(B, Hq, Lq, D)``, k ``(B, Hkv, Lk, D)``, v ``(B, Hkv, Lk, Dv)``.

    Args:
        name_prefix: put before each argument's name in messages (e.g. ``"attention: "``).
        gqa: allow ``Hkv != Hq`` (``Hq % Hkv == 0``); otherwise the head counts must be equal.
        same_length: require ``Lq == Lk`` (linear attention).
        kernel_limit: the Triton kernels run these inputs: head dims above :data:`MAX_HEAD_DIM` are
            rejected; ``None`` (default): when :func:`attncomp.runtime.device.use_triton` says they will.

    Returns ``(B, Hq, Hkv, Lq, Lk, D, Dv)``. Raises ``TypeError`` for non-tensors and non-float or
    mixed dtypes, ``ValueError`` for shapes and devices.
    """
    p = name_prefix
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(x, f"{p}{name}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{p}{name} must be 4-D (B, H, L, D), got shape {shape(x)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float(x, name, p)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{p}q, k and v must have the same dtype: q is {q.dtype}, k is {k.dtype}, v is {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"{p}q, k and v must be on the same device: q is on {q.device}, k on {k.device}, "
                         f"v on {v.device}")
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, Dv = v.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{p}q, k and v must have the same batch size (axis 0): q is {shape(q)}, k is {shape(k)}, "
                         f"v is {shape(v)}")
    if D == 0:
        raise ValueError(f"{p}q and k must have a head dim (last axis) >= 1, got q {shape(q)}")
    if k.shape[-1] != D:
        raise ValueError(f"{p}q and k must have the same head dim (last axis): q is {shape(q)}, k is {shape(k)}")
    if k.shape[1:3] != v.shape[1:3]:
        raise ValueError(f"{p}k and v must have the same number of heads (axis 1) and length (axis 2): "
                         f"k is {shape(k)}, v is {shape(v)}")
    if gqa:
        if Hkv == 0 and Hq != 0 or Hkv != 0 and Hq % Hkv:
            raise ValueError(f"{p}the query heads (axis 1) must be a multiple of key/value heads (GQA): q has "
                             f"{Hq} ({shape(q)}), k and v have {Hkv} ({shape(k)})")
    elif Hkv != Hq:
        raise ValueError(f"{p}q, k and v must have the same number of heads (axis 1): q is {shape(q)}, "
                         f"k is {shape(k)}")
    if same_length and Lk != Lq:
        raise ValueError(f"{p}q, k and v must have the same length (axis 2): q is {shape(q)}, k is {shape(k)}")
    if kernel_limit is None:
        kernel_limit = use_triton(q)
    if kernel_limit and max(D, Dv) > MAX_HEAD_DIM:
        which = "q and k" if D > MAX_HEAD_DIM else "v"
        raise ValueError(f"{p}head dim {max(D, Dv)} of {which} (last axis) exceeds {MAX_HEAD_DIM}, the largest the "
                         f"Triton kernels support: q is {shape(q)}, v is {shape(v)}")
    return B, Hq, Hkv, Lq, Lk, D, Dv


def _check_broadcast(t: Tensor, name: str, scores: tuple[int, ...], like: Tensor) -> None:
    if t.device != like.device:
        raise ValueError(f"{name} must be on q's device ({like.device}), got {t.device}")
    if t.dim() > len(scores):
        raise ValueError(f"{name} of shape {shape(t)} has more than {len(scores)} dims; expected a shape "
                         f"broadcastable to (B, Hq, Lq, Lk) = {scores}")
    try:
        out = torch.broadcast_shapes(t.shape, scores)
    except RuntimeError:
        out = None
    if out != torch.Size(scores):
        raise ValueError(f"{name} of shape {shape(t)} does not broadcast to (B, Hq, Lq, Lk) = {scores}")


def check_keep(keep, scores: tuple[int, ...], like: Tensor, name: str = "keep") -> None:
    """A boolean visibility mask (True = visible) broadcastable to ``scores`` = ``(B, Hq, Lq, Lk)``,
    on ``like``'s device."""
    if keep is None:
        return
    check_tensor(keep, name)
    if keep.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = visible), got {keep.dtype}; pass an additive "
                        "float mask as bias=")
    _check_broadcast(keep, name, scores, like)


def check_additive(bias, scores: tuple[int, ...], like: Tensor, name: str = "bias") -> None:
    """An additive float mask / bias broadcastable to ``scores`` = ``(B, Hq, Lq, Lk)``, on ``like``'s
    device (``-inf`` and ``finfo.min`` entries are allowed: they mask)."""
    if bias is None:
        return
    check_tensor(bias, name)
    if bias.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor added to the scores, got {bias.dtype}; pass a "
                        "boolean mask as keep=")
    _check_broadcast(bias, name, scores, like)


def check_scale(scale, name: str = "scale") -> float | None:
    """``None`` or a finite real number; returns it as a float (``None`` kept)."""
    if scale is None:
        return None
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {shape(scale)}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"{name} must be finite, got {scale}")
    return float(scale)


def check_softcap(softcap) -> float:
    """A finite number ``>= 0`` (0 = no soft-cap)."""
    value = check_scale(softcap, "softcap")
    if value is None or value < 0:
        raise ValueError(f"softcap must be a number >= 0 (0 disables it), got {softcap}")
    return value


def is_empty(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Nothing to compute: an empty output (``B·Hq·Lq·Dv = 0``) or no keys (``Lk = 0``)."""
    return q.shape[:-1].numel() == 0 or v.shape[-1] == 0 or k.shape[-2] == 0


def empty_result(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The defined result of an :func:`is_empty` call: out ``(B, Hq, Lq, Dv)`` zeros in q's dtype (a
    query with no key to attend to gets zeros) and lse ``(B, Hq, Lq)`` float32 ``-inf``."""
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    lse = torch.full(q.shape[:-1], -math.inf, dtype=torch.float32, device=q.device)
    return out, lse
