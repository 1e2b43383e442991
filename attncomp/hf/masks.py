"""transformers' mask functions read as attncomp IR: the ``AttentionMaskInterface`` entry of
``attn_implementation="attncomp"``.

transformers builds every mask from a *mask function* over ``(batch_idx, head_idx, q_idx, kv_idx)``
(``transformers.masking_utils``: ``causal_mask_function``, ``sliding_window_overlay(w)``, ``and_masks``,
``packed_sequence_compatibility_function``, …) and hands it, with the 2-D key-padding mask and the
query / key offsets of the cache, to the mask interface of the attention implementation. Instead of
evaluating it on an ``(Lq, Lk)`` grid, :func:`mask_interface` reads the function's structure (which
factory made it and its closure values: no tensor is evaluated) and returns an :class:`AttncompMask`:
the IR mask in the attention call's local coordinates, plus the ``(B, Lk)`` key-padding tensor and
the ``(B, L)`` document ids of packed sequences. A mask function of another shape raises
``ValueError`` naming it.

Nothing here imports transformers: functions are recognised by their module and qualified name.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from attncomp import ir

_MU = "transformers.masking_utils"


@dataclass(frozen=True)
class Band:
    """Key at absolute position ``kv`` visible from query at absolute position ``q`` iff
    ``q - left <= kv <= q + right``; ``None`` leaves that side unbounded (``Band(None, 0)``: causal,
    ``Band(w - 1, 0)``: a causal sliding window of ``w`` keys, ``Band(None, None)``: full)."""

    left: int | None = None
    right: int | None = None

    def __and__(self, other: Band) -> Band:
        def tight(a, b):
            return b if a is None else a if b is None else min(a, b)

        return Band(tight(self.left, other.left), tight(self.right, other.right))

    def local(self, delta: int):
        """The IR mask over local indices ``(i, j)`` when query ``i`` sits at ``i + q_offset`` and key ``j``
        at ``j + kv_offset``, ``delta = q_offset - kv_offset``: ``j - i`` must lie in
        ``[delta - left, delta + right]``."""
        if self.left is None and self.right is None:
            return ir.Full()
        if self.left is None:
            return ir.Causal(self.right + delta)
        return ir.Window(self.left - delta, None if self.right is None else self.right + delta)

    def row(self, delta: int, Lk: int, device) -> Tensor:
        """The visible keys ``(Lk,)`` bool of the single query ``i = 0`` (a decode step)."""
        j = torch.arange(Lk, device=device)
        keep = torch.ones(Lk, dtype=torch.bool, device=device)
        if self.left is not None:
            keep &= j >= delta - self.left
        if self.right is not None:
            keep &= j <= delta + self.right
        return keep


@dataclass(frozen=True, eq=False)
class AttncompMask:
    """What ``attn_implementation="attncomp"`` passes to the attention function instead of an
    ``(B, 1, Lq, Lk)`` mask tensor.

    Attributes:
        band: the static pattern over absolute positions (causal, sliding window, full).
        q_offset, kv_offset: absolute position of the first query / key of the call.
        key_padding: ``(B, Lk)`` bool, True = a real token, already aligned with the keys; or None.
        documents: ``(B, Lq)`` int document ids of packed sequences (``Lq == Lk``, offsets 0), or None.
        batch_size, q_length, kv_length: the sizes transformers asked for.

    ``shape`` / ``dtype`` / ``device`` answer like the ``(B, 1, Lq, Lk)`` bool mask this stands for, for
    code that inspects the mask; indexing or arithmetic on it raises ``TypeError``. ``generate`` with a
    StaticCache prepares the masks before the forward and passes them back in as ``attention_mask``:
    :func:`mask_interface` then returns that description unchanged (its sizes are checked).
    """

    band: Band
    q_offset: int
    kv_offset: int
    key_padding: Tensor | None
    documents: Tensor | None
    batch_size: int
    q_length: int
    kv_length: int
    device: torch.device

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.batch_size, 1, self.q_length, self.kv_length))

    @property
    def ndim(self) -> int:
        return 4

    def dim(self) -> int:
        return 4

    @property
    def dtype(self) -> torch.dtype:
        return torch.bool

    @property
    def delta(self) -> int:
        """``q_offset - kv_offset``: the causal offset of the call (the past length in a decode step)."""
        return self.q_offset - self.kv_offset

    def ir(self):
        """The static IR mask over the call's local ``(i, j)``: ``Full``, ``Causal(offset)`` or ``Window``."""
        return self.band.local(self.delta)

    def contiguous(self) -> AttncompMask:
        """``self``: generate() calls ``.contiguous()`` on the masks it prepares ahead of a compiled forward."""
        return self

    def __getitem__(self, item):
        raise TypeError("an attn_implementation='attncomp' mask is a description (AttncompMask), not a tensor; "
                        "it can only be consumed by attncomp's attention function")

    def __str__(self) -> str:
        parts = [str(self.ir())]
        if self.key_padding is not None:
            parts.append("key_padding")
        if self.documents is not None:
            parts.append("documents")
        return f"AttncompMask({' & '.join(parts)}, q_offset={self.q_offset}, kv_offset={self.kv_offset})"


def _closure(fn) -> dict:
    return inspect.getclosurevars(fn).nonlocals


def _name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def read_mask_function(fn) -> tuple[Band, Tensor | None]:
    """``(band, documents)`` of a transformers mask function; ``documents`` ``(B, L)`` or None.

    Raises ``ValueError`` naming a mask function that is not causal / bidirectional / sliding window
    (causal or bidirectional) / an ``and_masks`` of those / packed sequences over one of those."""
    if getattr(fn, "__module__", None) == _MU:
        q = fn.__qualname__
        if q == "causal_mask_function":
            return Band(None, 0), None
        if q == "bidirectional_mask_function":
            return Band(None, None), None
        if q == "sliding_window_overlay.<locals>.inner_mask":  # kv > q - w
            return Band(_closure(fn)["sliding_window"] - 1, None), None
        if q == "sliding_window_bidirectional_overlay.<locals>.inner_mask":  # |q - kv| <= w
            w = _closure(fn)["sliding_window"]
            return Band(w, w), None
        if q == "and_masks.<locals>.and_mask":
            band, docs = Band(), None
            for part in _closure(fn)["mask_functions"]:
                b, d = read_mask_function(part)
                band = band & b
                if d is not None:
                    if docs is not None:
                        raise ValueError("attncomp: two packed-sequence masks in one and_masks")
                    docs = d
            return band, docs
        if q == "packed_sequence_mask_function.<locals>.inner_mask":  # same document
            return Band(), _closure(fn)["packed_sequence_mask"]
        if q == "remap_positions_for_packed_sequence.<locals>.inner_mask":
            # positions restart per document and rise by one inside it, so the inner pattern over positions
            # is the same pattern over token indices once queries and keys share a document
            band, docs = read_mask_function(_closure(fn)["mask_function"])
            if docs is not None:
                raise ValueError("attncomp: nested packed-sequence masks")
            return band, None
    raise ValueError(
        f"attn_implementation='attncomp' cannot read the mask function {_name(fn)} as an attncomp mask (it reads "
        "causal, bidirectional and sliding-window masks, and_masks of them, and packed sequences; not "
        "or_masks, chunked or blockwise overlays or custom functions). Use attn_implementation='sdpa' for "
        "this model, or attncomp.optimize(model), which proves masks from the captured graph.")


def _as_int(x, what: str) -> int:
    if isinstance(x, torch.Tensor):
        # StaticCache returns its offset as a tensor (no graph break under torch.compile); the IR's
        # offsets are Python ints, so this is a host read. The decode op (kv_lens as a tensor) removes it.
        return int(x.item())
    if not isinstance(x, int):
        raise TypeError(f"attncomp mask: {what} must be an int or a 0-d tensor, got {type(x).__name__}")
    return x


def mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                   mask_function=None, attention_mask: Tensor | None = None, device="cpu",
                   **kwargs) -> AttncompMask:
    """The ``AttentionMaskInterface`` function of ``attn_implementation="attncomp"``.

    Args (as transformers passes them, see ``transformers.masking_utils.sdpa_mask``):
        batch_size, q_length, kv_length: sizes of the attention call the mask is for.
        q_offset, kv_offset: absolute position of the first query / key (the cache's past length
            and the start of a sliding-window cache); ``q_offset`` may be a 0-d tensor (StaticCache).
        mask_function: the pattern (see :func:`read_mask_function`).
        attention_mask: ``(B, N)`` key padding (bool or 0/1), ``N <= kv_offset + kv_length``, or None.
        device: the device of the attention inputs.
        kwargs: ``dtype``, ``config``, ``allow_is_causal_skip``, ``use_vmap``, ``local_size``…: not needed.

    Returns:
        an :class:`AttncompMask`; no ``(Lq, Lk)`` tensor is built.
    """
    if isinstance(attention_mask, AttncompMask):  # prepared by generate() for this very call
        if (attention_mask.batch_size, attention_mask.q_length, attention_mask.kv_length) != (
                batch_size, q_length, kv_length):
            raise ValueError(f"attncomp mask: a prepared {attention_mask} of shape {tuple(attention_mask.shape)} "
                             f"passed for batch={batch_size}, Lq={q_length}, Lk={kv_length}")
        return attention_mask
    if mask_function is None:
        raise ValueError("attncomp mask: transformers passed no mask_function")
    band, documents = read_mask_function(mask_function)
    q_offset, kv_offset = _as_int(q_offset, "q_offset"), _as_int(kv_offset, "kv_offset")
    padding = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size:
            raise ValueError(f"attncomp mask: attention_mask must be (batch={batch_size}, keys), got "
                             f"{tuple(attention_mask.shape)}")
        padding = attention_mask.to(device=device, dtype=torch.bool)
        missing = kv_offset + kv_length - padding.shape[1]
        if missing > 0:  # as transformers' prepare_padding_mask: keys past the mask (a StaticCache's free slots)
            padding = torch.nn.functional.pad(padding, (0, missing))
        padding = padding[:, kv_offset:kv_offset + kv_length]
    if documents is not None and (q_offset, kv_offset, q_length) != (0, 0, kv_length):
        raise ValueError("attncomp mask: packed sequences need queries and keys to be the same tokens "
                         f"(got q_offset={q_offset}, kv_offset={kv_offset}, Lq={q_length}, Lk={kv_length})")
    return AttncompMask(band, q_offset, kv_offset, padding, documents, batch_size, q_length, kv_length,
                        torch.device(device))
