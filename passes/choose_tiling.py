"""Pass: choose block sizes for a plan (heuristic; the autotune cache overrides it)."""

from __future__ import annotations

from attncomp.ir import Plan, Tiling


def choose_tiling(plan: Plan) -> Plan:
    d = plan.spec.dims.Dk or 64
    if d <= 64:
        tiling = Tiling(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    elif d <= 128:
        tiling = Tiling(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    else:
        tiling = Tiling(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    return plan.with_(tiling=tiling)
