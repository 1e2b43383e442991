"""The IR: what an attention site computes (``AttentionSpec``) and how we run it (``Plan``).

Small on purpose. A spec is built by ``analyze`` from a matched site; passes turn a spec into a
plan; the runtime executes a plan. Everything here is a frozen dataclass so specs and plans can be
hashed, compared and used as cache keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

# ---------------------------------------------------------------------------------------------
# Masks. Each leaf is either static (known at compile time) or runtime (a tensor at call time).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Full:
    """No mask: every query sees every key."""

    def __str__(self) -> str:
        return "full"


@dataclass(frozen=True)
class Causal:
    """Key ``j`` is visible from query ``i`` iff ``j <= i + offset`` (offset 0: top-left aligned)."""

    offset: int = 0

    def __str__(self) -> str:
        return "causal" if self.offset == 0 else f"causal({self.offset:+d})"


@dataclass(frozen=True)
class Window:
    """``i - left <= j <= i + right`` (``None``: unbounded on that side)."""

    left: int | None
    right: int | None

    def __str__(self) -> str:
        return f"window({self.left},{self.right})"


@dataclass(frozen=True)
class Neighborhood:
    """NATTEN-style neighborhood over a 1-3-D grid."""

    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    causal: tuple[bool, ...]

    def __str__(self) -> str:
        return f"neighborhood(k={self.kernel},d={self.dilation})"


@dataclass(frozen=True)
class BlockDiagonal:
    size: int

    def __str__(self) -> str:
        return f"block_diagonal({self.size})"


@dataclass(frozen=True)
class TensorMask:
    """A mask that arrives as a tensor at run time (bool keep-mask or additive float)."""

    kind: Literal["bool", "additive"]
    shape: tuple[int, ...] | None = None

    def __str__(self) -> str:
        shape = "x".join(str(s) for s in self.shape) if self.shape else "?"
        return f"tensor[{self.kind} {shape}]"


@dataclass(frozen=True)
class And:
    parts: tuple

    def __str__(self) -> str:
        return " & ".join(str(p) for p in self.parts)


Mask = Full | Causal | Window | Neighborhood | BlockDiagonal | TensorMask | And


def mask_and(*masks: Mask) -> Mask:
    """Conjunction of masks, dropping ``Full`` and flattening nested ``And``."""
    parts: list = []
    for m in masks:
        if isinstance(m, Full):
            continue
        parts.extend(m.parts if isinstance(m, And) else (m,))
    if not parts:
        return Full()
    return parts[0] if len(parts) == 1 else And(tuple(parts))


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    """Sizes of a site, as seen on the example (or first) inputs. ``None``: not known yet."""

    B: int | None = None
    Hq: int | None = None
    Hkv: int | None = None
    Lq: int | None = None
    Lk: int | None = None
    Dk: int | None = None
    Dv: int | None = None

    def __str__(self) -> str:
        def f(x):
            return "?" if x is None else str(x)

        heads = f(self.Hq) if self.Hq == self.Hkv else f"{f(self.Hq)}/{f(self.Hkv)}"
        return f"B{f(self.B)} H{heads} L{f(self.Lq)}x{f(self.Lk)} D{f(self.Dk)}"


@dataclass(frozen=True)
class Score:
    """How raw ``q·kᵀ`` becomes the softmax input.

    ``scale`` is a float, ``"tensor"`` (a run-time tensor folded into q) or ``None`` (SDPA default
    ``1/sqrt(D)``). ``bias`` names the additive terms (``"tensor"``, ``"rel_pos"``...). ``softcap``
    is ``0.0`` when absent.
    """

    scale: float | str | None = None
    bias: tuple[str, ...] = ()
    softcap: float = 0.0

    def __str__(self) -> str:
        s = "default" if self.scale is None else (
            self.scale if isinstance(self.scale, str) else f"{self.scale:.4g}")
        parts = [f"scale={s}"] + [f"+{b}" for b in self.bias]
        if self.softcap:
            parts.append(f"softcap={self.softcap:g}")
        return " ".join(parts)


@dataclass(frozen=True)
class AttentionSpec:
    """What one attention site computes.

    ``empty_rows`` records what the eager site returns for a query row whose every key is masked
    with ``-inf``: ``"nan"`` (explicit softmax chains) or ``"zero"`` (torch SDPA).
    ``dropout_p`` is the site's dropout probability when training (0.0 when it has none).
    """

    dims: Dims
    dtype: str = "float32"
    layout: Literal["BHLD", "BLHD"] = "BHLD"
    kernel: Literal["softmax", "linear", "tensor"] = "softmax"
    score: Score = field(default_factory=Score)
    mask: Mask = field(default_factory=Full)
    dropout_p: float = 0.0
    empty_rows: Literal["nan", "zero"] = "nan"
    contract: str = "exact"

    def with_(self, **changes) -> AttentionSpec:
        return replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiling:
    BLOCK_M: int = 64
    BLOCK_N: int = 64
    num_warps: int = 4
    num_stages: int = 2
    split_kv: int = 1


@dataclass(frozen=True)
class Plan:
    """How a spec runs: strategy, tiling, reduction order, and why."""

    spec: AttentionSpec
    strategy: str = "dense"
    tiling: Tiling = field(default_factory=Tiling)
    reduction: str = "online_softmax"
    reasons: tuple[str, ...] = ()

    def with_(self, **changes) -> Plan:
        return replace(self, **changes)
