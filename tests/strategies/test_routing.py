"""Content routing (attncomp.routing, ops.routed_attention) against brute-force and float64 references."""

import math

import pytest
import torch

import attncomp
from attncomp import ops
from attncomp.masks import blocks
from attncomp.strategies.sparse import routing
from conftest import rel_err

# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------


def brute_selection(q, k, region, topk):
    """Bool (B, Hq, nQR, nKR) from explicit loops: region means, dot products, top-k with ties to the
    lower index."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nqr, nkr = math.ceil(Lq / region), math.ceil(Lk / region)
    sel = torch.zeros(B, Hq, nqr, nkr, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            kmeans = [k[b, h // G, j * region:(j + 1) * region].double().mean(0) for j in range(nkr)]
            for i in range(nqr):
                qm = q[b, h, i * region:(i + 1) * region].double().mean(0)
                aff = [float(sum(qm[d] * kmeans[j][d] for d in range(D))) for j in range(nkr)]
                for j in sorted(range(nkr), key=lambda j: (-aff[j], j))[:topk]:
                    sel[b, h, i, j] = True
    return sel


def dense_ref(q, k, v, visible, scale=None):
    """float64 attention under ``visible`` (B, Hq, Lq, Lk); rows with no visible key give zeros."""
    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1).double(), v.repeat_interleave(G, 1).double()
    s = q.double() @ kk.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    return torch.softmax(s.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0) @ vv


def expected_states(sel, region, Lq, Lk):
    st = torch.where(sel, blocks.FULL, blocks.EMPTY).to(torch.uint8)
    if Lk % region:
        st[..., -1] = torch.where(sel[..., -1], blocks.PARTIAL, blocks.EMPTY)
    if Lq % region:
        st[..., -1, :] = torch.where(sel[..., -1, :], blocks.PARTIAL, blocks.EMPTY)
    return st


# ----------------------------------------------------------------------------------------------
# (1) the table
# ----------------------------------------------------------------------------------------------

TABLE_CASES = [  # B, Hq, Hkv, Lq, Lk, D, region, topk
    (1, 1, 1, 20, 20, 4, 4, 2),
    (2, 3, 3, 23, 23, 5, 4, 3),
    (2, 4, 2, 17, 30, 3, 5, 2),
    (1, 2, 1, 33, 9, 4, 8, 5),     # topk > number of key regions (2)
    (3, 2, 2, 16, 16, 4, 4, 4),    # topk == number of key regions
    (1, 1, 1, 7, 13, 3, 16, 1),    # one region, shorter than `region`
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,region,topk", TABLE_CASES,
                         ids=[f"B{c[0]}-H{c[1]}kv{c[2]}-Lq{c[3]}-Lk{c[4]}-r{c[6]}-top{c[7]}" for c in TABLE_CASES])
def test_table_matches_brute_force(B, Hq, Hkv, Lq, Lk, D, region, topk):
    q = torch.randn(B, Hq, Lq, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, dtype=torch.float64)
    sel = brute_selection(q, k, region, topk)
    table = routing.routed_block_table(q, k, region, topk)
    assert (table.block_m, table.block_n, table.Lq, table.Lk) == (region, region, Lq, Lk)
    assert torch.equal(table.states, expected_states(sel, region, Lq, Lk))
    assert torch.equal(routing.selection(q, k, region, topk), sel)
    kept = (table.kv_num + table.full_num).long()
    assert torch.all(kept == min(topk, math.ceil(Lk / region)))


def test_ties_go_to_the_lower_index():
    q = torch.randn(2, 2, 24, 4)
    k = torch.zeros(2, 2, 24, 4)  # every affinity is 0
    k[:, :, 16:20] = 1.0  # key region 4 ties with none: ±|mean q| decides where it ranks
    sel = routing.selection(q, k, 4, 3)
    assert torch.equal(sel, brute_selection(q, k, 4, 3))
    zero = routing.selection(q, torch.zeros_like(k), 4, 3)
    assert torch.all(zero[..., :3]) and not torch.any(zero[..., 3:])


def test_selection_is_detached():
    q = torch.randn(1, 2, 32, 8, requires_grad=True)
    k = torch.randn(1, 2, 32, 8, requires_grad=True)
    table = routing.routed_block_table(q, k, 8, 2)
    assert not any(t.requires_grad for t in table.tensors)


# ----------------------------------------------------------------------------------------------
# (2) routed attention on the CPU executor, (3) on the Triton kernels (interpreter)
# ----------------------------------------------------------------------------------------------


def _check_against_dense(B, Hq, Hkv, Lq, Lk, D, region, topk, dtype, tol):
    q = torch.randn(B, Hq, Lq, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, D, dtype=dtype, requires_grad=True)
    out = ops.routed_attention(q, k, v, region=region, topk=topk)
    visible = routing.expand_selection(routing.selection(q, k, region, topk), region, Lq, Lk)
    assert visible.shape == (B, Hq, Lq, Lk)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = dense_ref(qd, kd, vd, visible)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < tol
    dout = torch.randn_like(ref)
    (out.double() * dout).sum().backward()
    (ref * dout).sum().backward()
    for name, x, xd in (("dq", q, qd), ("dk", k, kd), ("dv", v, vd)):
        assert rel_err(x.grad, xd.grad) < tol, name


CPU_CASES = [  # B, Hq, Hkv, Lq, Lk, D, region, topk
    (2, 3, 3, 70, 70, 16, 16, 2),
    (1, 4, 2, 50, 90, 8, 12, 3),    # GQA, Lq != Lk, region not a power of two
    (2, 2, 1, 33, 33, 8, 8, 10),    # topk > number of key regions: dense
    (1, 2, 2, 64, 40, 8, 16, 1),
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,region,topk", CPU_CASES,
                         ids=[f"B{c[0]}-H{c[1]}kv{c[2]}-Lq{c[3]}-Lk{c[4]}-D{c[5]}-r{c[6]}-top{c[7]}-f32"
                              for c in CPU_CASES])
def test_routed_attention_cpu(B, Hq, Hkv, Lq, Lk, D, region, topk):
    _check_against_dense(B, Hq, Hkv, Lq, Lk, D, region, topk, torch.float32, 1e-5)


def test_routed_attention_float64_and_no_grad():
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        out = ops.routed_attention(q, k, v, region=8, topk=2)
    visible = routing.expand_selection(routing.selection(q, k, 8, 2), 8, 40, 40)
    assert rel_err(out, dense_ref(q, k, v, visible)) < 1e-12


TRITON_CASES = [  # B, Hq, Hkv, Lq, Lk, D, region, topk
    (1, 2, 2, 64, 64, 16, 16, 2),
    (2, 2, 1, 96, 80, 16, 32, 1),   # GQA, tails, Lq != Lk
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,region,topk", TRITON_CASES,
                         ids=[f"B{c[0]}-H{c[1]}kv{c[2]}-Lq{c[3]}-Lk{c[4]}-D{c[5]}-r{c[6]}-top{c[7]}-triton"
                              for c in TRITON_CASES])
def test_routed_attention_triton_interpreter(B, Hq, Hkv, Lq, Lk, D, region, topk, monkeypatch):
    from attncomp.strategies.sparse import launcher as triton_sparse

    calls = {"fwd": 0, "bwd": 0}
    for name in calls:
        fn = getattr(triton_sparse, f"sparse_{name}")
        monkeypatch.setattr(triton_sparse, f"sparse_{name}",
                            lambda *a, _fn=fn, _n=name, **kw: calls.__setitem__(_n, calls[_n] + 1) or _fn(*a, **kw))
    attncomp.set_kernels("triton")
    try:
        _check_against_dense(B, Hq, Hkv, Lq, Lk, D, region, topk, torch.float32, 1e-4)
    finally:
        attncomp.set_kernels(None)
    assert calls["fwd"] >= 1 and calls["bwd"] >= 1, calls


# ----------------------------------------------------------------------------------------------
# (4) errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("region,topk,exc,msg", [
    (0, 2, ValueError, "region must be >= 1"),
    (-4, 2, ValueError, "region must be >= 1"),
    (8, 0, ValueError, "topk must be >= 1"),
    (8.0, 2, TypeError, "region must be an int"),
    (8, True, TypeError, "topk must be an int"),
])
def test_bad_region_or_topk(region, topk, exc, msg):
    q = k = v = torch.randn(1, 1, 16, 4)
    with pytest.raises(exc, match=msg):
        routing.routed_block_table(q, k, region, topk)
    with pytest.raises(exc, match=msg):
        ops.routed_attention(q, k, v, region=region, topk=topk)


def test_bad_shapes():
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        routing.selection(torch.randn(1, 3, 16, 4), torch.randn(1, 2, 16, 4), 4, 1)
    with pytest.raises(ValueError, match="4-D"):
        routing.selection(torch.randn(3, 16, 4), torch.randn(3, 16, 4), 4, 1)


def test_triton_needs_power_of_two_region():
    q = torch.randn(1, 1, 48, 16)
    attncomp.set_kernels("triton")
    try:
        with pytest.raises(ValueError, match="power of two >= 16"):
            ops.routed_attention(q, q, q, region=12, topk=1)
    finally:
        attncomp.set_kernels(None)
