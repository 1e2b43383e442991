"""What one attention site computes: :class:`AttentionSpec` (dims, score, mask, kernel form)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from attncomp.ir.masks import Full, Mask

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
class LinearForm:
    """A site written as linear attention (``kernel="linear"``): ``num / (den + eps)`` with features
    ``feature_map`` (``"elu1"``, ``"relu"``, or ``"graph"``: the model's own ops compute them)."""

    feature_map: str
    causal: bool
    eps: float

    def __str__(self) -> str:
        return f"φ={self.feature_map}, {'causal' if self.causal else 'non-causal'}, eps={self.eps:g}"


@dataclass(frozen=True)
class TensorForm:
    """A site written as tensor (2-simplicial) attention (``kernel="tensor"``): a softmax over key
    pairs of ``scale · Σ_d q_id k1_jd k2_ld``, contracted with ``v1_jd v2_ld``."""

    scale: float

    def __str__(self) -> str:
        return f"order 2 (key pairs), scale={self.scale:.4g}"


@dataclass(frozen=True)
class AttentionSpec:
    """What one attention site computes.

    ``empty_rows`` records what the eager site returns for a query row whose every key is masked
    with ``-inf``: ``"nan"`` (explicit softmax chains) or ``"zero"`` (torch SDPA).
    ``dropout_p`` is the site's dropout probability when training (0.0 when it has none).
    ``contract`` is ``"exact"``, or ``"approx"`` in plans of opt-in approximations.
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
    form: LinearForm | TensorForm | None = None  # kernel "linear" / "tensor": what the site computes
    # the eager site is already one fused kernel call with nothing attncomp could skip: an SDPA call with no
    # mask, or with a mask tensor no proof gave structure to (a learned bias, a mask handed in as input)
    fused_eager: bool = False
    # the device type the site was captured on ("cpu", "cuda"): where a strategy's gain was measured per device
    device: str = "cpu"

    def with_(self, **changes) -> AttentionSpec:
        return replace(self, **changes)
