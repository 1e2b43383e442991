"""Where kernels run: Triton on CUDA (and on CPU through Triton's interpreter when asked), the torch
executors otherwise."""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["use_triton", "set_kernels"]

_FORCE_TRITON = {"value": None}


def use_triton(t: Tensor) -> bool:
    """Triton on CUDA; on CPU only when the interpreter switch is on (``ATTNCOMP_KERNELS=triton``).

    float64 always runs on the torch executor (the kernels take fp32, fp16 and bf16).
    """
    forced = _FORCE_TRITON["value"]
    if forced is None:
        forced = os.environ.get("ATTNCOMP_KERNELS", "auto")
    if forced == "torch" or t.dtype == torch.float64:
        return False
    if t.is_cuda:
        return True
    return forced == "triton"


def set_kernels(mode: str | None) -> None:
    """``"triton"``: CPU tensors too run the Triton kernels, through Triton's interpreter — which
    needs ``TRITON_INTERPRET=1`` in the environment before torch is first imported (the kernels
    raise a clear error otherwise); ``"torch"``: never Triton; ``None``: ``$ATTNCOMP_KERNELS``."""
    if mode not in (None, "auto", "triton", "torch"):
        raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {mode!r}")
    _FORCE_TRITON["value"] = mode
