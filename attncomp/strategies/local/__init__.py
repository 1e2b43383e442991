"""Local attention: sliding windows and neighborhoods (1-3-D, dilation, stride, causal), run on the
block-sparse kernel, which visits only the tiles near the diagonal. Exact, so ``auto`` picks it
where a proved mask is local. Ops in NATTEN's layout: :mod:`attncomp.strategies.local.op`.
"""

from __future__ import annotations

from dataclasses import dataclass

from attncomp.ir import AttentionSpec, Neighborhood, Plan, Window, runtime_part, static_part
from attncomp.strategies.base import Registered, Strategy, leaves
from attncomp.strategies.sparse.tables import describe, too_dense


@dataclass(frozen=True)
class Local(Strategy):
    """Local attention (sliding window, neighborhood). Exact: used only where the mask is local."""

    name = "local"


def plan(spec: AttentionSpec, requested: Strategy) -> Plan | str | None:
    if spec.kernel != "softmax" or requested.name not in ("auto", "local", "sparse") or requested.approximate:
        return None
    if any(t.role == "general" for t in runtime_part(spec.mask)):
        return None
    if not any(isinstance(x, (Window, Neighborhood)) for x in leaves(static_part(spec.mask))):
        return None
    if requested.name == "auto" and (why := too_dense(spec)):
        return why
    why = f"{requested.name}: local block-sparse kernel, {describe(spec)}"
    return Plan(spec=spec, strategy="local", reasons=(why,))


STRATEGY = Registered("local", Local, plan)
