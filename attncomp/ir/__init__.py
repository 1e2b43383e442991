"""The IR: what an attention site computes (``AttentionSpec``) and how we run it (``Plan``).

Small on purpose. A spec is built by ``analyze`` from a matched site; passes turn a spec into a
plan; the runtime executes a plan. Everything here is a frozen dataclass so specs and plans can be
hashed, compared and used as cache keys.

The IR is split by what it describes: :mod:`.masks` (mask kinds), :mod:`.spec` (the spec),
:mod:`.plan` (the plan), :mod:`.program` (the typed score program); this package re-exports them.
"""

from attncomp.ir.masks import (
    STATIC,
    And,
    BlockDiagonal,
    Causal,
    Full,
    Grid,
    Mask,
    Neighborhood,
    Or,
    Predicate,
    Prefix,
    TensorMask,
    Window,
    mask_and,
    runtime_part,
    static_part,
)
from attncomp.ir.plan import REDUCTIONS, VARIANTS, Plan
from attncomp.ir.spec import AttentionSpec, Dims, LinearForm, Score, TensorForm

__all__ = [
    "And", "BlockDiagonal", "Causal", "Full", "Grid", "Mask", "Neighborhood", "Or", "Predicate", "Prefix",
    "STATIC", "TensorMask", "Window", "mask_and", "runtime_part", "static_part", "Plan", "REDUCTIONS", "VARIANTS",
    "AttentionSpec", "Dims", "LinearForm", "Score", "TensorForm",
]
