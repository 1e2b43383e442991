"""Block tables, the block-sparse CPU executor and the local-attention ops, against float64 references."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from attncomp import ir, ops
from attncomp.masks import blocks
from attncomp.strategies.local import op as local_op
from conftest import rel_err

# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------


def dense_ref(q, k, v, visible, bias=None, scale=None, softcap=0.0):
    """float64 masked attention; rows with no visible key give zeros. visible (…, Lq, Lk) bool."""
    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1).double(), v.repeat_interleave(G, 1).double()
    s = q.double() @ kk.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.double()
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    return p @ vv


def natten_neighbors(i: int, X: int, K: int, d: int, s: int, causal: bool) -> list[int]:
    """Positions query ``i`` sees on one axis of extent X, written out from NATTEN's definition:
    the dilation group of ``i``, then the window of the stride group's leader, shifted inside."""
    g, xi = i % d, i // d
    Xg = len(range(g, X, d))
    if causal:
        leader = min((xi // s) * s + s - 1, Xg - 1)
        js = [j for j in range(Xg) if j <= xi and leader - j < K]
    else:
        leader = min((xi // s) * s + s // 2, Xg - 1)
        start = min(max(leader - K // 2, 0), Xg - K)
        js = list(range(start, start + K))
    return [j * d + g for j in js]


def natten_window_start_v1(i: int, L: int, K: int, d: int) -> int:
    """NATTEN's original (stride 1, odd kernel, non-causal) window start, as its early CUDA kernels
    computed it; the window is start, start + d, …, start + (K - 1)·d."""
    nh = K // 2
    if d <= 1:
        return max(i - nh, 0) + (i + nh >= L) * (L - i - nh - 1)
    ni = i - nh * d
    if ni < 0:
        return i % d
    if i + nh * d >= L:
        imodd = i % d
        a = (L // d) * d
        b = L - a
        if imodd < b:
            return L - b + imodd - 2 * nh * d
        return a + imodd - K * d
    return ni


def natten_visible(spatial, kernel, dilation, stride, causal) -> torch.Tensor:
    """(L, L) bool over row-major tokens: the product of the per-axis neighbour sets."""
    axes = []
    for X, K, d, s, c in zip(spatial, kernel, dilation, stride, causal):
        m = torch.zeros(X, X, dtype=torch.bool)
        for i in range(X):
            m[i, natten_neighbors(i, X, K, d, s, c)] = True
        axes.append(m)
    vis = axes[0]
    for m in axes[1:]:
        vis = (vis[:, None, :, None] & m[None, :, None, :]).reshape(vis.shape[0] * m.shape[0], -1)
    return vis


# ----------------------------------------------------------------------------------------------
# mask predicates
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("X,K,d", [(13, 3, 1), (13, 5, 2), (17, 3, 4), (20, 7, 2), (9, 9, 1)])
def test_neighborhood_matches_natten_v1_window_start(X, K, d):
    expect = torch.zeros(X, X, dtype=torch.bool)
    for i in range(X):
        start = natten_window_start_v1(i, X, K, d)
        expect[i, [start + t * d for t in range(K)]] = True
    assert torch.equal(natten_visible((X,), (K,), (d,), (1,), (False,)), expect)
    mask = ops.neighborhood_mask((X,), K, d)
    assert torch.equal(blocks.dense_keep(mask.expr(), X, X), expect)


NA_CASES = [
    ((23,), (7,), (2,), (1,), (False,)),
    ((23,), (7,), (2,), (3,), (False,)),
    ((23,), (6,), (3,), (2,), (True,)),
    ((22,), (4,), (1,), (4,), (False,)),  # even kernel, blocked
    ((9, 13), (3, 5), (1, 2), (1, 1), (False, True)),
    ((10, 12), (4, 3), (2, 3), (3, 2), (True, False)),
    ((4, 5, 6), (3, 3, 3), (1, 1, 2), (1, 2, 1), (False, False, True)),
]


@pytest.mark.parametrize("spatial,kernel,dilation,stride,causal", NA_CASES,
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_neighborhood_expr_matches_definition(spatial, kernel, dilation, stride, causal):
    mask = ops.neighborhood_mask(spatial, kernel, dilation, stride, causal)
    L = math.prod(spatial)
    assert torch.equal(blocks.dense_keep(mask.expr(), L, L), natten_visible(spatial, kernel, dilation, stride, causal))


@pytest.mark.parametrize("mask,kind", [
    (ir.Causal(0), lambda i, j: j <= i), (ir.Causal(-3), lambda i, j: j <= i - 3),
    (ir.Window(4, 2), lambda i, j: i - 4 <= j <= i + 2), (ir.BlockDiagonal(5), lambda i, j: i // 5 == j // 5),
    (ir.Grid(3), lambda i, j: i % 3 == j % 3), (ir.Or((ir.Prefix(4), ir.Causal())), lambda i, j: j < 4 or j <= i),
], ids=str)
def test_static_predicates(mask, kind):
    Lq, Lk = 19, 23
    expect = torch.tensor([[kind(i, j) for j in range(Lk)] for i in range(Lq)])
    assert torch.equal(blocks.dense_keep(mask.expr(), Lq, Lk), expect)


# ----------------------------------------------------------------------------------------------
# block tables
# ----------------------------------------------------------------------------------------------


def _check_states(table, vis, bm, bn, exact: bool):
    """Every tile's state against the visible matrix: exact, or (for conjunctions, whose states are
    combined per tile) sound — EMPTY only if nothing is visible, FULL only if everything is."""
    Lq, Lk = vis.shape[-2:]
    for b in range(vis.shape[0]):
        for i in range(-(-Lq // bm)):
            for j in range(-(-Lk // bn)):
                tile = vis[b, 0, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
                tail = (i + 1) * bm > Lq or (j + 1) * bn > Lk
                bt = min(b, table.states.shape[0] - 1)
                state = int(table.states[bt, 0, i, j])
                expect = blocks.EMPTY if not tile.any() else (
                    blocks.FULL if tile.all() and not tail else blocks.PARTIAL)
                if exact:
                    assert state == expect, (b, i, j)
                else:
                    assert state != blocks.EMPTY or not tile.any(), (b, i, j)
                    assert state != blocks.FULL or (tile.all() and not tail), (b, i, j)
                listed = table.kv_idx[bt, 0, i, :table.kv_num[bt, 0, i]].tolist()
                flisted = table.full_idx[bt, 0, i, :table.full_num[bt, 0, i]].tolist()
                assert (j in listed) == (state == blocks.PARTIAL) and (j in flisted) == (state == blocks.FULL)
                qlisted = table.q_idx[bt, 0, j, :table.q_num[bt, 0, j]].tolist()
                assert (i in qlisted) == (state == blocks.PARTIAL)


@pytest.mark.parametrize("bm,bn", [(16, 16), (8, 32), (32, 8)])
@pytest.mark.parametrize("source", ["static", "keep", "both"])
def test_block_states(bm, bn, source):
    Lq, Lk = 77, 93
    keep = torch.rand(2, 1, Lq, Lk) > 0.3
    keep[0, :, :, 40:] = False
    keep[1, :, :, :33] = True
    expr = ir.And((ir.Window(20, 5), ir.Grid(2))).expr()
    vis = blocks.dense_keep(expr, Lq, Lk).expand(1, 1, Lq, Lk)
    if source != "static":
        vis = (vis if source == "both" else True) & keep
    table = blocks.block_table(expr if source != "keep" else None, keep if source != "static" else None,
                               Lq, Lk, bm, bn, "cpu")
    _check_states(table, vis, bm, bn, exact=source != "both")


@pytest.mark.parametrize("mask", [ir.Causal(0), ir.Causal(-3), ir.Causal(20), ir.Window(17, 0), ir.Window(9, 5),
                                  ir.And((ir.Causal(), ir.Window(30, 0)))], ids=str)
@pytest.mark.parametrize("Lq,Lk,bm,bn", [(77, 93, 16, 16), (100, 60, 32, 8)])
def test_difference_form_states_match_exhaustive(monkeypatch, mask, Lq, Lk, bm, bn):
    assert blocks.difference_form(mask.expr()) is not None
    analytic = blocks.static_states(mask.expr(), Lq, Lk, bm, bn, "cpu")
    monkeypatch.setattr(blocks, "difference_form", lambda expr: None)
    assert torch.equal(analytic, blocks.static_states(mask.expr(), Lq, Lk, bm, bn, "cpu"))


@pytest.mark.parametrize("mask", [ir.BlockDiagonal(5), ir.Or((ir.Prefix(3), ir.Causal())), ir.Grid(2)], ids=str)
def test_difference_form_refuses_other_predicates(mask):
    assert blocks.difference_form(mask.expr()) is None


def test_block_table_cache_follows_tensor_identity_and_version():
    keep = torch.ones(1, 1, 40, 40, dtype=torch.bool)
    t1 = blocks.block_table(None, keep, 40, 40, 16, 16, "cpu")
    assert blocks.block_table(None, keep, 40, 40, 16, 16, "cpu") is t1
    keep[..., 20:] = False  # in-place change bumps the version: a new table
    t2 = blocks.block_table(None, keep, 40, 40, 16, 16, "cpu")
    assert t2 is not t1 and int(t2.states[0, 0, 0, 2]) == blocks.EMPTY


def test_causal_window_skips_most_tiles():
    table = blocks.block_table(ir.Window(255, 0).expr(), None, 4096, 4096, 64, 64, "cpu")
    assert 0.9 < table.skipped_fraction() < 0.95
    assert int((table.kv_num + table.full_num).max()) == 5


# ----------------------------------------------------------------------------------------------
# the executor through ops.attention
# ----------------------------------------------------------------------------------------------

MASKS = [ir.Causal(0), ir.Causal(7), ir.Window(17, 0), ir.Window(9, 5), ir.BlockDiagonal(24), ir.Grid(3),
         ir.Or((ir.Prefix(10), ir.Causal(0))), ops.neighborhood_mask((9, 13), (3, 5), (1, 2), 1, (False, True)),
         None]


@pytest.mark.parametrize("mask", MASKS, ids=str)
@pytest.mark.parametrize("extras", ["plain", "pad-gqa-bias", "softcap"])
def test_attention_fwd_bwd(mask, extras):
    B, Hq, Hkv, L, D, Dv = 2, 4, (2 if extras == "pad-gqa-bias" else 4), 117, 40, 24
    q = torch.randn(B, Hq, L, D, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, requires_grad=True)
    v = torch.randn(B, Hkv, L, Dv, requires_grad=True)
    keep = bias = None
    if extras == "pad-gqa-bias":
        keep = torch.ones(B, 1, 1, L, dtype=torch.bool)
        keep[1, ..., 90:] = False
        keep[0, ..., :5] = False  # with causal masks, rows 0-4 of batch 0 see nothing
        bias = torch.randn(1, Hq, L, L, requires_grad=True)
    softcap = 5.0 if extras == "softcap" else 0.0
    out = ops.attention(q, k, v, mask, keep=keep, bias=bias, softcap=softcap, blocks_mn=(16, 32))
    vis = blocks.dense_keep(None if mask is None else mask.expr(), L, L)
    if keep is not None:
        vis = vis & keep
    ref = dense_ref(q, k, v, vis, bias, softcap=softcap)
    assert rel_err(out, ref) <= 1e-5
    g = torch.randn_like(out)
    leaves = [t for t in (q, k, v, bias) if t is not None]
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g.double())):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("mask", MASKS, ids=str)
@pytest.mark.parametrize("extras", ["plain", "pad-gqa-bias"])
@pytest.mark.parametrize("Dv,blocks_mn", [(40, (16, 32)), (40, (32, 16)), (24, (16, 32))],
                         ids=["fused-gather", "fused-band", "softmax"])
def test_attention_inference(mask, extras, Dv, blocks_mn):
    """Under no_grad the executor runs torch's fused CPU kernel on the gathered blocks (Dv == D) or
    a softmax path; both against the float64 reference, empty rows included."""
    B, Hq, Hkv, L, D = 2, 4, (2 if extras != "plain" else 4), 117, 40
    q, k, v = torch.randn(B, Hq, L, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, Dv)
    keep = bias = None
    if extras != "plain":
        keep = torch.ones(B, 1, 1, L, dtype=torch.bool)
        keep[1, ..., 90:] = False
        keep[0, ..., :5] = False
        bias = torch.randn(1, Hq, L, L)
    with torch.no_grad():
        out = ops.attention(q, k, v, mask, keep=keep, bias=bias, blocks_mn=blocks_mn)
    vis = blocks.dense_keep(None if mask is None else mask.expr(), L, L)
    vis = vis if keep is None else vis & keep
    assert rel_err(out, dense_ref(q, k, v, vis, bias)) <= 1e-5


@pytest.mark.parametrize("mask,runs", [
    # 16-query blocks see keys [q - 40, q]: block i reads key blocks max(0, i - 3) .. i
    (ir.Window(40, 0), [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3), (3, 4, 3, 4)]),
    # one block per grid row; 3x3 neighbourhood: rows r-1..r+1, shifted inwards at the top and bottom
    (ops.neighborhood_mask((8, 16), 3), [(0, 1, 0, 3), (1, 7, 1, 3), (7, 8, 2, 3)]),
], ids=str)
def test_band_runs(mask, runs):
    """Query blocks that read keys at a fixed stride are grouped into runs (a, b, c, W): blocks
    a <= i < b read key blocks [i - c, i - c + W), as strided views."""
    from attncomp.strategies.sparse import op as sparse

    L = 64 if isinstance(mask, ir.Window) else 128
    table = blocks.block_table(mask.expr(), None, L, L, 16, 16, "cpu")
    idx, _, valid = sparse._union(table.kv_num, table.kv_idx, table.full_num, table.full_idx)
    assert sparse._band_runs(idx, valid, 16, 16) == runs


def test_attention_float64_and_empty_rows_give_zero():
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    keep[..., :8] = False
    out = ops.attention(q, k, v, ir.Causal(0), keep=keep, blocks_mn=(16, 16))
    ref = dense_ref(q, k, v, blocks.dense_keep("(kv <= q + 0)", 40, 40) & keep)
    assert out.dtype == torch.float64 and rel_err(out, ref) <= 1e-12
    assert torch.equal(out[:, :, :8], torch.zeros_like(out[:, :, :8]))


def test_attention_matches_sdpa_bf16():
    q, k, v = (torch.randn(1, 2, 96, 32, dtype=torch.bfloat16) for _ in range(3))
    keep = blocks.dense_keep(ir.Window(20, 0).expr(), 96, 96)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep)
    assert rel_err(ops.attention(q, k, v, ir.Window(20, 0)), ref) <= 1e-2


def test_opcheck_and_compile():
    q, k, v = (torch.randn(1, 2, 50, 16, requires_grad=True) for _ in range(3))
    expr = ir.Window(6, 0).expr()
    table = blocks.block_table(expr, None, 50, 50, 16, 16, "cpu")
    torch.library.opcheck(torch.ops.attncomp.sparse_fwd.default,
                          (q, k, v, None, None, *table.tensors, 0.25, 0.0, expr, 16, 16))
    torch.library.opcheck(torch.ops.attncomp.block_table.default, (q, None, expr, 50, 50, 16, 16))
    fn = torch.compile(lambda a, b, c: ops.attention(a, b, c, ir.Window(6, 0)), fullgraph=True)
    assert rel_err(fn(q, k, v), ops.attention(q, k, v, ir.Window(6, 0))) == 0.0


def test_memory_is_linear_in_length():
    """L = 32768 with a 64-key window: dense scores alone would take 4 GiB; the executor stays small."""
    code = ("import resource, torch\nfrom attncomp import ops, ir\n"
            "q, k, v = (torch.randn(1, 1, 32768, 16) for _ in range(3))\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "with torch.no_grad():\n    out = ops.attention(q, k, v, ir.Window(63, 0))\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    grown_mib = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                   env=env).stdout.split()[-1])
    assert grown_mib < 512, f"peak RSS grew by {grown_mib} MiB"


# ----------------------------------------------------------------------------------------------
# the local family
# ----------------------------------------------------------------------------------------------


def _na_ref(q, k, v, visible):
    B = q.shape[0]
    flat = [x.reshape(B, -1, x.shape[-2], x.shape[-1]).transpose(1, 2) for x in (q, k, v)]
    out = dense_ref(*flat, visible)
    return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])


@pytest.mark.parametrize("spatial,kernel,dilation,stride,causal", NA_CASES + [((16, 24), (5, 3), (2, 1), (1, 2),
                                                                               (False, True)),
                                                                              ((20, 16), 5, 1, 1, False)],
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_neighborhood_attention(spatial, kernel, dilation, stride, causal):
    q, k, v = (torch.randn(2, *spatial, 2, 16, requires_grad=True) for _ in range(3))
    out = ops.neighborhood_attention(q, k, v, kernel, dilation, stride, causal)
    n = len(spatial)
    ref = _na_ref(q, k, v, natten_visible(spatial, *(local_op._per_axis(x, n, "") for x in (kernel, dilation, stride,
                                                                                        causal))))
    assert out.shape == q.shape and rel_err(out, ref) <= 1e-5
    with torch.no_grad():  # the inference path (fused CPU kernel; a band of rows for 2-D grids)
        assert rel_err(ops.neighborhood_attention(q, k, v, kernel, dilation, stride, causal), ref) <= 1e-5
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g.double())):
        assert rel_err(a, b) <= 1e-5


def test_block_and_grid_attention_match_explicit_partitions():
    B, X, Y, H, D, w = 2, 8, 12, 2, 16, 4
    q, k, v = (torch.randn(B, X, Y, H, D) for _ in range(3))

    def windows(t):  # (B, X, Y, H, D) -> (B * nwin, H, w*w, D), Swin's partition
        t = t.reshape(B, X // w, w, Y // w, w, H, D).permute(0, 1, 3, 5, 2, 4, 6)
        return t.reshape(-1, H, w * w, D)

    out = F.scaled_dot_product_attention(windows(q), windows(k), windows(v))
    out = out.reshape(B, X // w, Y // w, H, w, w, D).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, X, Y, H, D)
    assert rel_err(ops.block_attention(q, k, v, w), out) <= 1e-5

    g = (2, 3)  # MaxViT grid: tokens spaced (X//2, Y//3) apart form one group

    def grids(t):
        t = t.reshape(B, g[0], X // g[0], g[1], Y // g[1], H, D).permute(0, 2, 4, 5, 1, 3, 6)
        return t.reshape(-1, H, g[0] * g[1], D)

    out = F.scaled_dot_product_attention(grids(q), grids(k), grids(v))
    out = out.reshape(B, X // g[0], Y // g[1], H, g[0], g[1], D).permute(0, 4, 1, 5, 2, 3, 6).reshape(B, X, Y, H, D)
    assert rel_err(ops.grid_attention(q, k, v, g), out) <= 1e-5


def test_halo_attention_sees_block_plus_halo():
    mask = ops.neighborhood_mask((32,), 8 + 2 * 2, 1, 8)
    vis = blocks.dense_keep(mask.expr(), 32, 32)
    assert vis[9].nonzero().flatten().tolist() == list(range(6, 18))  # block 8-15, halo 2 each side
    assert vis[0].nonzero().flatten().tolist() == list(range(0, 12))  # shifted inwards at the border
    q, k, v = (torch.randn(1, 32, 2, 16) for _ in range(3))
    assert rel_err(ops.halo_attention(q, k, v, 8, 2), _na_ref(q, k, v, vis)) <= 1e-5


@pytest.mark.parametrize("call,match", [
    (lambda q: ops.neighborhood_attention(q, q, q, 9), "exceeds the input extent"),
    (lambda q: ops.neighborhood_attention(q, q, q, 3, stride=4), "stride 4 exceeds kernel_size 3"),
    (lambda q: ops.neighborhood_attention(q, q, q, (3, 3, 3)), "3 entries for 2 spatial axes"),
    (lambda q: ops.block_attention(q, q, q, 3), "multiples of the window"),
    (lambda q: ops.attention(q[:, :, :, 0], q[:, :, :, 0], q[:, :, :, 0], ir.TensorMask("bool")), "keep="),
    (lambda q: ops.attention(q[:, :, :, 0], q[:, :, :, 0], q[:, :, :, 0], keep=torch.ones(8, 8)), "bool"),
    (lambda q: ops.attention(q[:, :, :, 0], q[:, :, :, 0], q[:, :, :, 0],
                             keep=torch.ones(3, 3, dtype=torch.bool)), "does not broadcast"),
])
def test_bad_input_is_named(call, match):
    q = torch.randn(1, 8, 8, 2, 4)
    with pytest.raises((ValueError, TypeError), match=match):
        call(q)


def test_block_sizes_are_autotuned_once(monkeypatch, tmp_path):
    """With autotuning on, the first call times every tile-size candidate on the CPU executor and
    caches the winner; a second call with the same mask and shape bucket reuses it."""
    from attncomp.runtime import autotune

    monkeypatch.setenv("ATTNCOMP_AUTOTUNE", "1")
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE_CACHE", str(tmp_path / "cache.json"))
    autotune.reset()
    q, k, v = (torch.randn(1, 2, 200, 32) for _ in range(3))
    before = dict(autotune.STATS)
    with torch.no_grad():
        out = ops.attention(q, k, v, ir.Window(30, 0))
        tuned = autotune.STATS["tuned"] - before["tuned"]
        timed = autotune.STATS["candidates"] - before["candidates"]
        again = ops.attention(q, k, v, ir.Window(30, 0))
    assert tuned == 1 and timed >= 3
    assert autotune.STATS["tuned"] - before["tuned"] == 1 and autotune.STATS["hit"] > before["hit"]
    (entry,) = [e for e in autotune.entries("cpu") if e["kernel"] == "sparse_fwd"]
    assert {"BLOCK_M", "BLOCK_N"} <= set(entry["config"])
    ref = dense_ref(q, k, v, blocks.dense_keep(ir.Window(30, 0).expr(), 200, 200))
    assert rel_err(out, ref) <= 1e-5 and torch.equal(out, again)
