"""Ring attention (attncomp.distributed) on CPU with gloo, in spawned processes.

One spawn per world size (2, 3, 4) runs every case inside and reports relative errors and traffic;
the tests below read that report. Cases: every mask kind (none, causal, window, block-diagonal) × both
layouts, forward and backward against the single-process float64 reference; bytes sent per rank
(windows talk only to neighbours, causal skips empty steps); a 2-layer Llama-style model run
context-parallel against the unsharded model (logits, all-reduced parameter gradients).
"""

from __future__ import annotations

import json
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attncomp import ir

TOL = 1e-5
WORLDS = (2, 3, 4)
LAYOUTS = ("contiguous", "zigzag")
L = 24  # global length: divisible by 2W for W = 2, 3, 4
MASKS = {
    "none": None,
    "causal": ir.Causal(0),
    "causal(-3)": ir.Causal(-3),
    "causal(+5)": ir.Causal(5),
    "window(5,0)": ir.Window(5, 0),
    "window(3,7)": ir.Window(3, 7),
    "window(None,2)": ir.Window(None, 2),
    "block_diagonal(5)": ir.BlockDiagonal(5),
    "block_diagonal(12)": ir.BlockDiagonal(12),
}
# (name, B, Hq, Hkv, D, Dv, dtype): GQA everywhere; one Dv != D case and one float64 case (own bwd)
SHAPES = {"B2-H4-Hkv2-D8": (2, 4, 2, 8, 8, torch.float32)}
EXTRA = [("causal", "zigzag", "B1-H2-Hkv1-D8-Dv6", (1, 2, 1, 8, 6, torch.float32)),
         ("window(5,0)", "contiguous", "B1-H2-Hkv2-D8-f64", (1, 2, 2, 8, 8, torch.float64))]


# ---------------------------------------------------------------------------------------------
# A hand-written 2-layer Llama-style model (RMSNorm, RoPE on global positions, GQA, causal, SwiGLU)
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(1.0 + 0.1 * torch.randn(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, pos, base: float = 10000.0):
    """x (B, H, n, hd), pos (n,) global positions."""
    hd = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, hd, 2, dtype=x.dtype) / hd)
    ang = pos.to(x.dtype)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, hidden):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.wq = nn.Linear(dim, heads * self.hd, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.wo = nn.Linear(heads * self.hd, dim, bias=False)
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, pos, attend):
        B, n, _ = x.shape
        h = self.norm1(x)
        q = self.wq(h).view(B, n, self.heads, self.hd).transpose(1, 2)
        k = self.wk(h).view(B, n, self.kv_heads, self.hd).transpose(1, 2)
        v = self.wv(h).view(B, n, self.kv_heads, self.hd).transpose(1, 2)
        o = attend(rope(q, pos), rope(k, pos), v)  # (B, H, n, hd)
        x = x + self.wo(o.transpose(1, 2).reshape(B, n, -1))
        h = self.norm2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class TinyLlama(nn.Module):
    def __init__(self, vocab=64, dim=32, heads=4, kv_heads=2, hidden=64, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, kv_heads, hidden) for _ in range(layers))
        self.norm, self.head = RMSNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, pos, attend):
        """tokens (B, n) int64, pos (n,) global positions → logits (B, n, vocab)."""
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, pos, attend)
        return self.head(self.norm(x))


# ---------------------------------------------------------------------------------------------
# Worker (runs in each spawned process)
# ---------------------------------------------------------------------------------------------


def _rel_all(pairs, dist, group=None):
    """Global ‖out − ref‖ / ‖ref‖ per name from per-rank shards: pairs = {name: (out, ref)}."""
    names = sorted(pairs)
    sums = torch.tensor([[(pairs[n][0].double() - pairs[n][1].double()).pow(2).sum().item(),
                          pairs[n][1].double().pow(2).sum().item()] for n in names], dtype=torch.float64)
    dist.all_reduce(sums, group=group)
    return {n: math.sqrt(d) / max(math.sqrt(r), 1e-30) for n, (d, r) in zip(names, sums.tolist())}


def _attention_case(mask, layout, shape, seed, dist, D_, group=None):
    B, Hq, Hkv, D, Dv, dtype = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, L, d, generator=g, dtype=torch.float64) for h, d in ((Hq, D), (Hkv, D), (Hkv, Dv)))
    dout = torch.randn(B, Hq, L, Dv, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = D_.naive.reference_attention(*leaves, mask=mask)
    ref.backward(dout)
    xs = [D_.shard(t, 2, layout, group).to(dtype).requires_grad_() for t in (q, k, v)]
    out = D_.ring_attention(*xs, mask=mask, layout=layout, group=group)
    out.backward(D_.shard(dout, 2, layout, group).to(dtype))
    pairs = {"out": (out, D_.shard(ref.detach(), 2, layout, group))}
    for name, x, leaf in zip(("dq", "dk", "dv"), xs, leaves):
        pairs[name] = (x.grad, D_.shard(leaf.grad, 2, layout, group))
    errs = _rel_all(pairs, dist, group)
    errs["dtype_ok"] = float(out.dtype == dtype and all(x.grad.dtype == dtype for x in xs))
    return errs


def _naive_case(layout, dist, D_):
    """naive_ring_attention (all-gather reference, differentiable) against the single-process one."""
    mask = ir.Window(4, 1)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, L, 8, generator=g, dtype=torch.float64) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = D_.naive.reference_attention(*leaves, mask=mask)
    (ref * ref).sum().backward()
    xs = [D_.shard(t, 2, layout).requires_grad_() for t in (q, k, v)]
    out = D_.naive.naive_ring_attention(*xs, mask=mask, layout=layout)
    (out * out).sum().backward()
    pairs = {"out": (out, D_.shard(ref.detach(), 2, layout))}
    for name, x, leaf in zip(("dq", "dk", "dv"), xs, leaves):
        pairs[name] = (x.grad, D_.shard(leaf.grad, 2, layout))
    return _rel_all(pairs, dist)


def _traffic_case(mask, layout, dist, D_, length=48):
    """Bytes and peers this rank sent (forward / backward), and the steps in which it computed."""
    W = dist.get_world_size()
    x = [torch.randn(1, 2, length // W, 8, requires_grad=True) for _ in range(3)]
    with D_.traffic() as t:
        D_.ring_attention(*x, mask=mask, layout=layout).sum().backward()
    return {"fwd_bytes": t.bytes_sent("fwd"), "bwd_bytes": t.bytes_sent("bwd"),
            "fwd_peers": sorted(t.peers("fwd")), "bwd_peers": sorted(t.peers("bwd")),
            "fwd_shifts": sorted({c[1] for c in t.calls if c[0] == "fwd"}),
            "fwd_scores": t.score_elements("fwd"), "row_bytes": 2 * 8 * 4 * 2}  # B·Hkv·(D+Dv)·4 bytes per row


def _model_case(layout, dist, D_):
    torch.manual_seed(0)
    B = 2
    model = TinyLlama()
    ref_model = TinyLlama().double()
    ref_model.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (B, L), generator=g)
    targets = torch.randint(0, 64, (B, L), generator=g)

    ref_logits = ref_model(tokens, torch.arange(L), lambda q, k, v: D_.naive.reference_attention(q, k, v, ir.Causal(0)))
    F.cross_entropy(ref_logits.reshape(-1, 64), targets.reshape(-1), reduction="sum").div(B * L).backward()

    return _sharded_run(lambda tok, pos: model(tok, pos, lambda q, k, v: D_.ring_attention(
        q, k, v, mask=ir.Causal(0), layout=layout)), model, ref_model, ref_logits, tokens, targets, layout, dist, D_)


def _sharded_run(run, model, ref_model, ref_logits, tokens, targets, layout, dist, D_) -> dict:
    """``run(tokens shard, positions)`` on this rank's shard, its loss backward; logits and the
    all-reduced parameter gradients against the unsharded reference (whose backward ran)."""
    W, B = dist.get_world_size(), tokens.shape[0]
    pos = D_.shard_positions(L // W, layout)
    tok, tgt = D_.shard(tokens, 1, layout), D_.shard(targets, 1, layout)
    logits = run(tok, pos)
    F.cross_entropy(logits.reshape(-1, 64), tgt.reshape(-1), reduction="sum").div(B * L).backward()
    grads = {}
    for (name, p), (_, rp) in zip(model.named_parameters(), ref_model.named_parameters()):
        dist.all_reduce(p.grad)
        grads[name] = (p.grad - rp.grad).norm().item() / rp.grad.norm().item()
    full = D_.unshard(logits.detach(), 1, layout)
    return {"logits": ((full.double() - ref_logits.detach()).norm() / ref_logits.detach().norm()).item(),
            "grad_max": max(grads.values()), "grad_worst": max(grads, key=grads.get)}


def _sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class SDPALlama(nn.Module):
    """TinyLlama whose attention is written as SDPA (what ``optimize`` finds and replaces)."""

    def __init__(self):
        super().__init__()
        self.inner = TinyLlama()

    def forward(self, tokens, pos):
        return self.inner(tokens, pos, _sdpa_gqa)


def _optimized_case(layout, dist, D_):
    """``attncomp.optimize(model, context_parallel=...)``: the model as written, each rank on its shard."""
    import attncomp

    torch.manual_seed(0)
    B = 2
    model, ref_model = SDPALlama(), SDPALlama().double()
    ref_model.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(5)
    tokens, targets = torch.randint(0, 64, (B, L), generator=g), torch.randint(0, 64, (B, L), generator=g)
    ref_logits = ref_model(tokens, torch.arange(L))
    F.cross_entropy(ref_logits.reshape(-1, 64), targets.reshape(-1), reduction="sum").div(B * L).backward()
    fast = attncomp.optimize(model, context_parallel=D_.ContextParallel(layout=layout))
    res = _sharded_run(fast, model, ref_model, ref_logits, tokens, targets, layout, dist, D_)
    rows = attncomp.explain(fast).rows
    return {**res, "replaced": sum(r.status == "replaced" for r in rows),
            "ring": all("context parallel: ring attention" in r.reason for r in rows),
            "fused": sum(r.kernel.calls["fused"] for r in rows if r.kernel is not None)}


def _worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    import attncomp.distributed as D_
    import attncomp.distributed.naive  # noqa: F401
    from attncomp.distributed import schedule

    schedule.TILE_ROWS = 4  # tiny shapes: still cut partial window / block-diagonal pairs into tiles
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    report = {"attention": {}, "traffic": {}, "model": {}, "naive": {}, "subgroups": {}, "errors": []}
    try:
        cases = [(m, lay, sn, shape) for m in MASKS for lay in LAYOUTS for sn, shape in SHAPES.items()] + EXTRA
        for i, (mname, lay, sname, shape) in enumerate(cases):
            report["attention"][f"W{world}-{lay}-{mname}-{sname}"] = _attention_case(MASKS[mname], lay, shape, i,
                                                                                      dist, D_)
        if world == 4:  # two groups of 2 ranks, each with its own sequence: group= and group ranks
            groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            for lay in LAYOUTS:
                errs = _attention_case(ir.Causal(0), lay, SHAPES["B2-H4-Hkv2-D8"], 100 + rank // 2, dist, D_,
                                       group=groups[rank // 2])
                per_group = [None] * world
                dist.all_gather_object(per_group, errs)
                report["subgroups"][lay] = per_group
        for lay in LAYOUTS:
            report["naive"][lay] = _naive_case(lay, dist, D_)
            report["model"][lay] = _model_case(lay, dist, D_)
            if world in (2, 3):
                report.setdefault("optimized", {})[lay] = _optimized_case(lay, dist, D_)
            for mname, mask in (("causal", ir.Causal(0)), ("window(3,0)", ir.Window(3, 0)), ("none", None),
                                ("block_diagonal(12)", ir.BlockDiagonal(12))):
                t = _traffic_case(mask, lay, dist, D_)
                per_rank = [None] * world
                dist.all_gather_object(per_rank, t)
                report["traffic"][f"{lay}-{mname}"] = per_rank
    except Exception as e:  # reported, and re-raised so the spawn fails loudly
        report["errors"].append(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    finally:
        if rank == 0:
            with open(path, "w") as f:
                json.dump(report, f)
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_REPORTS: dict[int, dict] = {}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    def get(world: int) -> dict:
        if world not in _REPORTS:
            path = str(tmp_path_factory.mktemp(f"ring{world}") / "report.json")
            torch.multiprocessing.spawn(_worker, args=(world, _free_port(), path), nprocs=world, join=True)
            with open(path) as f:
                _REPORTS[world] = json.load(f)
        return _REPORTS[world]

    return get


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

ATTN_IDS = [(w, lay, m, s) for w in WORLDS for m in MASKS for lay in LAYOUTS for s in SHAPES]
ATTN_IDS += [(w, lay, m, s) for w in WORLDS for m, lay, s, _ in EXTRA]


@pytest.mark.parametrize("world,layout,mask,shape", ATTN_IDS, ids=[f"W{w}-{lay}-{m}-{s}" for w, lay, m, s in ATTN_IDS])
def test_ring_matches_float64_reference(report, world, layout, mask, shape):
    errs = report(world)["attention"][f"W{world}-{layout}-{mask}-{shape}"]
    assert errs.pop("dtype_ok") == 1.0, "outputs / gradients must keep the inputs' dtype"
    bad = {k: e for k, e in errs.items() if not e <= TOL}
    assert not bad, f"relative errors above {TOL:g}: {bad} (all: {errs})"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_naive_reference_gradients(report, world, layout):
    """The all-gather reference (shard / unshard autograd) gives the single-process gradients."""
    errs = report(world)["naive"][layout]
    assert max(errs.values()) <= 1e-12, errs


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_llama_context_parallel_matches_unsharded(report, world, layout):
    r = report(world)["model"][layout]
    assert r["logits"] <= TOL, r
    assert r["grad_max"] <= TOL, r


@pytest.mark.parametrize("world", (2, 3))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_optimize_context_parallel_matches_unsharded(report, world, layout):
    """attncomp.optimize(model, context_parallel=...) on the model as written (SDPA, GQA, RoPE with
    global positions): every site replaced and run as ring attention; logits and all-reduced gradients
    equal the unsharded float64 model's."""
    r = report(world)["optimized"][layout]
    assert r["replaced"] == 2 and r["ring"] and r["fused"] == 2, r
    assert r["logits"] <= TOL and r["grad_max"] <= TOL, r


def test_context_parallel_refuses_what_ring_attention_cannot_run():
    import attncomp
    from attncomp.distributed import ContextParallel

    class Biased(nn.Module):
        def forward(self, q, k, v, bias):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    q = torch.randn(1, 2, 8, 4)
    fast = attncomp.optimize(Biased(), context_parallel=ContextParallel())
    with pytest.raises(ValueError, match="cannot run context-parallel: its scores carry a bias"):
        fast(q, q, q, torch.randn(8, 8))
    with pytest.raises(TypeError, match="context_parallel must be"):
        attncomp.optimize(Biased(), context_parallel="world")
    with pytest.raises(ValueError, match="layout"):
        ContextParallel(layout="spiral")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_subgroups(report, layout):
    """Four ranks as two groups of two, each running its own sequence (group ranks != global ranks)."""
    for errs in report(4)["subgroups"][layout]:
        assert errs.pop("dtype_ok") == 1.0
        assert max(errs.values()) <= TOL, errs


def test_window_exchanges_only_with_neighbours(report):
    world = 4
    rows = report(world)["traffic"]
    for lay in LAYOUTS:
        for r, t in enumerate(rows[f"{lay}-window(3,0)"]):
            neighbours = {(r - 1) % world, (r + 1) % world} if lay == "zigzag" else {r + 1} & set(range(world))
            assert set(t["fwd_peers"]) <= neighbours, (lay, r, t)
    # contiguous, window of 4 keys (3 back), 12 rows per rank: each rank sends only the last 3 rows of
    # its shard to the next rank, and gets their gradients back
    for r, t in enumerate(rows["contiguous-window(3,0)"]):
        expected = 3 * t["row_bytes"] if r < world - 1 else 0
        assert t["fwd_bytes"] == expected, (r, t)
        assert t["fwd_peers"] == ([r + 1] if r < world - 1 else [])
        assert t["bwd_peers"] == sorted({r - 1, r + 1} & set(range(world)))
    # documents aligned with the shards: nothing to exchange at all
    assert all(t["fwd_bytes"] == 0 and t["bwd_bytes"] == 0 for t in rows["contiguous-block_diagonal(12)"])


def test_causal_skips_empty_steps(report):
    world = 4
    rows = report(world)["traffic"]
    full = rows["contiguous-none"]
    for r, t in enumerate(rows["contiguous-causal"]):
        # rank r needs the keys of ranks 0..r only: r + 1 compute steps, and sends to the W-1-r later ranks
        assert t["fwd_shifts"] == list(range(r + 1)), (r, t)
        assert t["fwd_bytes"] == (world - 1 - r) * 12 * t["row_bytes"], (r, t)
        assert t["fwd_scores"] < full[r]["fwd_scores"] or r == world - 1
    assert rows["contiguous-causal"][-1]["fwd_bytes"] == 0
    # zigzag: every rank computes about the same, and sends to an earlier rank only its first chunk
    zz = rows["zigzag-causal"]
    scores = [t["fwd_scores"] for t in zz]
    assert max(scores) == min(scores), scores
    for r, t in enumerate(zz):
        assert t["fwd_bytes"] == (r * 12 + (world - 1 - r) * 6) * t["row_bytes"], (r, t)
    assert sum(t["fwd_bytes"] for t in zz) < sum(t["fwd_bytes"] for t in full)


# ---------------------------------------------------------------------------------------------
# Single-process checks (no spawn)
# ---------------------------------------------------------------------------------------------


def test_single_process_is_plain_attention():
    from attncomp.distributed import naive, ring_attention

    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    for mask in MASKS.values():
        out = ring_attention(q, k, v, mask=mask)
        ref = naive.reference_attention(q, k, v, mask=mask)
        assert ((out.double() - ref).norm() / ref.norm()).item() <= TOL, mask


def test_schedule_classification_matches_predicate():
    """Interval arithmetic (empty / full / partial) against the mask's own predicate on every block."""
    from attncomp.distributed import naive, schedule

    for mask in MASKS.values():
        keep = naive.mask_matrix(schedule.normalize_mask(mask), 30)
        for q0, q1, k0, k1 in [(0, 6, 0, 6), (6, 12, 0, 6), (0, 6, 6, 12), (3, 17, 9, 30), (12, 18, 4, 5),
                               (20, 30, 0, 10), (0, 30, 0, 30), (25, 26, 20, 30)]:
            kind = schedule.classify(schedule.normalize_mask(mask), q0, q1, k0, k1)
            block = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool) if keep is None else keep[q0:q1, k0:k1]
            expect = "empty" if not block.any() else "full" if block.all() else "partial"
            assert kind == expect, (mask, (q0, q1, k0, k1))
            a, b = schedule.visible_keys(schedule.normalize_mask(mask), q0, q1, k0, k1)
            cols = block.any(0).nonzero().flatten()
            if len(cols):
                assert (a, b) == (k0 + cols.min().item(), k0 + cols.max().item() + 1), (mask, (q0, q1, k0, k1))


def test_clear_errors():
    from attncomp.distributed import ring_attention, shard

    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, q, q, layout="ring")
    with pytest.raises(ValueError, match="same positions"):
        ring_attention(q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match="multiple of Hkv"):
        ring_attention(torch.randn(1, 3, 6, 8), q, q)
    with pytest.raises(ValueError, match="multiple of 2"):
        ring_attention(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), layout="zigzag")
    with pytest.raises(TypeError, match="mask must be None"):
        ring_attention(q, q, q, mask=ir.Grid(2))
    with pytest.raises(TypeError, match="share dtype"):
        ring_attention(q, q.double(), q)
    with pytest.raises(ValueError, match="layout must be one of"):
        shard(q, 2, "rows")
