"""Compile once, run thin: the passes decide, the site module executes exactly that, with no host
synchronisation in the forward of a replaced site."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import attncomp
from attncomp.ir import AttentionSpec, Causal, Dims, Full, Score, TensorMask, Window, mask_and
from attncomp.ir.program import ProvedMask, Scale
from attncomp.masks.analysis import KeyPadding
from attncomp.passes import plan_site
from attncomp.runtime.site import SiteModule
from attncomp.strategies import parse
from attncomp.strategies.softmax_site import AttentionKernel, KernelMask
from conftest import rel_err, tiny_gpt2

SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
            torch.ops.aten.equal.default, torch.ops.aten.item.default}


class Recorder(TorchDispatchMode):
    """Records every aten op (and the numel of each tensor it returns) while active."""

    def __init__(self):
        super().__init__()
        self.syncs, self.numels = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "attncomp":  # attncomp's own custom ops: record what runs inside them too
            from torch._library.custom_ops import OPDEFS

            with self:
                out = OPDEFS[func.name()]._init_fn(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        if func in SYNC_OPS:
            self.syncs.append(str(func))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append(t.numel())
        return out


def _sites(fast) -> list[SiteModule]:
    return [r.kernel for r in attncomp.explain(fast).replaced]


def _record_sites(fast, run) -> Recorder:
    """Run ``run()`` with a :class:`Recorder` active inside every replaced site's forward only (the
    model's own code outside the sites — e.g. transformers' mask helpers — is not attncomp's)."""
    rec = Recorder()

    def recorded(forward):
        def run_site(*args):
            with rec:
                return forward(*args)
        return run_site

    sites = _sites(fast)
    for site in sites:
        site.forward = recorded(site.forward)
    try:
        run()
    finally:
        for site in sites:
            del site.forward
    return rec


class WindowAttention(nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, keep):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return x + self.proj(out.transpose(1, 2).reshape(B, L, C))


class SlidingWindowLM(nn.Module):
    """Mask built in forward from ``arange`` (causal, the last ``window`` keys), handed to SDPA."""

    def __init__(self, window=16, depth=2, dim=32):
        super().__init__()
        self.window = window
        self.embed = nn.Embedding(64, dim)
        self.layers = nn.ModuleList(WindowAttention(dim) for _ in range(depth))

    def forward(self, ids):
        i = torch.arange(ids.shape[1], device=ids.device)
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, keep)
        return x


def _hf(kind: str, impl: str):
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        return tiny_gpt2(2, impl)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(
            num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128, vocab_size=128,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=impl))
    return transformers.LlamaModel(transformers.LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=128,
        vocab_size=128, attn_implementation=impl))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
@torch.no_grad()
def test_no_host_sync_in_replaced_sites_transformers(kind, impl):
    model = _hf(kind, impl).eval()
    ids = torch.randint(0, 128, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 17:] = 0
    fast = attncomp.optimize(model, example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    assert len(_sites(fast)) == 2, str(attncomp.explain(fast))
    fast(ids, attention_mask=mask)  # steady state from here
    rec = _record_sites(fast, lambda: fast(ids, attention_mask=mask))
    assert rec.numels, "the recorder saw no op: the sites did not run"
    assert rec.syncs == [], rec.syncs
    ref = model(ids, attention_mask=mask).last_hidden_state
    out = fast(ids, attention_mask=mask).last_hidden_state
    assert rel_err(out[mask.bool()], ref[mask.bool()]) <= 1e-5


@pytest.mark.parametrize("strategy", ["auto", "dense"])
@torch.no_grad()
def test_vit_sdpa_without_mask_is_kept_or_sync_free(strategy):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              num_classes=0, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = attncomp.optimize(model, strategy=strategy, example_inputs=(x,))
    rep = attncomp.explain(fast)
    if strategy == "auto":  # nothing to gain: the SDPA calls stay as they are, and explain says why
        assert len(rep.kept) == 2 and not rep.replaced, str(rep)
        assert all("nothing to skip" in r.reason for r in rep.kept)
    else:  # asked for: replaced, and sync-free
        assert len(rep.replaced) == 2, str(rep)
        fast(x)
        rec = _record_sites(fast, lambda: fast(x))
        assert rec.numels and rec.syncs == [], rec.syncs
    assert rel_err(fast(x), model(x)) <= 1e-5


@torch.no_grad()
def test_sliding_window_sync_free_and_no_score_sized_tensors():
    model = SlidingWindowLM(window=16).eval()
    fast = attncomp.optimize(model)
    for L in (384, 448, 512):  # Dynamo recompiles with a symbolic length after the second
        ids = torch.randint(0, 64, (1, L))
        assert rel_err(fast(ids), model(ids)) <= 1e-5
    assert len(_sites(fast)) == 2 and all(s.plan.variant == "block-sparse" for s in _sites(fast))
    ids = torch.randint(0, 64, (1, 576))
    fast(ids)
    rec = _record_sites(fast, lambda: fast(ids))
    assert rec.numels and rec.syncs == [], rec.syncs
    assert max(rec.numels) < 576 * 576, max(rec.numels)  # no score-sized tensor: only the window's tiles


# ------------------------------------------------------------------------------------------------
# the passes on hand-built specs, and the runtime executing exactly what they chose
# ------------------------------------------------------------------------------------------------

DIMS = Dims(B=2, Hq=4, Hkv=2, Lq=64, Lk=64, Dk=16, Dv=16)
DECODE = Dims(B=2, Hq=8, Hkv=2, Lq=1, Lk=2048, Dk=64, Dv=64)
PAD = TensorMask("bool", None, "key_padding")


def _spec(mask=None, bias=(), fused_eager=False, dims=DIMS, device="cpu"):
    return AttentionSpec(dims=dims, score=Score(scale=0.25, bias=bias), mask=Full() if mask is None else mask,
                         fused_eager=fused_eager, device=device,
                         empty_rows="zero" if fused_eager else "nan")


LONG = Dims(B=2, Hq=4, Hkv=2, Lq=2048, Lk=2048, Dk=16, Dv=16)


@pytest.mark.parametrize("spec, requested, strategy, variant", [
    (_spec(fused_eager=True), "auto", "dense", "kept"),
    (_spec(fused_eager=True), "dense", "dense", "dense"),  # asked for: replaced
    (_spec(Causal(0)), "auto", "dense", "dense-causal"),
    (_spec(mask_and(Causal(0), PAD)), "auto", "dense", "dense-padding"),
    (_spec(mask_and(Full(), PAD)), "auto", "dense", "dense-padding"),
    # a window of 16 at 64x64 leaves 2 of 4 64x64 tiles: on CPU the block-sparse executor does not pay for that
    (_spec(Window(15, 0)), "auto", "dense", "dense"),
    (_spec(mask_and(Window(15, 0), PAD)), "auto", "dense", "dense"),
    (_spec(Window(15, 0), device="cuda"), "auto", "local", "block-sparse"),  # the GPU kernel skips at no cost
    (_spec(Window(15, 0)), "local", "local", "block-sparse"),  # asked for
    (_spec(Window(15, 0), dims=LONG), "auto", "local", "block-sparse"),  # 2048 long: 97% of tiles skipped
    (_spec(mask_and(Window(15, 0), PAD), dims=LONG), "auto", "local", "block-sparse"),
    (_spec(Causal(0), bias=("tensor",)), "auto", "dense", "dense"),
    (_spec(TensorMask("bool", (2, 1, 64, 64))), "auto", "dense", "dense"),
    (_spec(fused_eager=True, dims=DECODE), "auto", "dense", "decode"),
    (_spec(Causal(2044), dims=Dims(2, 8, 2, 4, 2048, 64, 64)), "auto", "dense", "decode"),  # bottom-right
    (_spec(Window(127, 2044), dims=Dims(2, 8, 2, 4, 2048, 64, 64)), "auto", "dense", "decode"),
    (_spec(Causal(0), dims=Dims(2, 8, 2, 4, 2048, 64, 64)), "auto", "dense", "dense-causal"),  # top-left: not decode
    (_spec(mask_and(Causal(2047), PAD), dims=DECODE), "auto", "dense", "dense-padding"),
], ids=["sdpa-no-mask", "sdpa-no-mask-dense-asked", "causal", "causal-padding", "padding", "window",
        "window-padding", "window-cuda", "window-local-asked", "window-long", "window-padding-long", "causal-bias",
        "tensor-mask", "decode-one-query", "decode-causal", "decode-window",
        "top-left-causal", "decode-padding"])
def test_passes_decide_on_hand_built_specs(spec, requested, strategy, variant):
    plan = plan_site(spec, parse(requested))
    assert (plan.strategy, plan.variant) == (strategy, variant), plan
    assert plan.reasons, "every decision says why"
    # a reduction order some kernel implements: split_kv only for the decode kernel
    assert plan.reduction == ("split_kv" if variant == "decode" else "online_softmax")
    assert (plan.splits > 0) == (variant == "decode" and spec.dims.B * spec.dims.Hkv < 200), plan


class _Calls:
    """Records the kernels a site module launches (their mask arguments) instead of guessing."""

    def __init__(self, monkeypatch):
        from attncomp.strategies.dense import op as dense_op

        self.log = []
        from attncomp.strategies.sparse import op as sparse_op

        real_run = dense_op.run
        real_sparse = sparse_op.run

        def run(q, k, v, bias, scale, causal, softcap=0.0, exact_lse=True):
            self.log.append(("dense", causal, None if bias is None else tuple(bias.shape)))
            return real_run(q, k, v, bias, scale, causal, softcap, exact_lse)

        def sparse(q, k, v, bias, keep, expr, *args):
            self.log.append(("sparse", expr))
            return real_sparse(q, k, v, bias, keep, expr, *args)

        from attncomp.strategies.decode import op as decode_op

        real_decode = decode_op.decode_fwd

        def decode(q, k, v, kv_lens, scale, window_left, softcap, splits):
            self.log.append(("decode", window_left, splits))
            return real_decode(q, k, v, kv_lens, scale, window_left, softcap, splits)

        monkeypatch.setattr(dense_op, "run", run)
        monkeypatch.setattr(sparse_op, "run", sparse)
        monkeypatch.setattr(decode_op, "decode_fwd", decode)


def _reference(q, k, v, visible, scale):
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * scale
    s = s.masked_fill(~visible, -math.inf)
    return (torch.softmax(s, -1).nan_to_num(0.0) @ v.double().repeat_interleave(2, 1)).float()


@pytest.mark.parametrize("mask, variant, launched", [
    (Causal(0), "dense-causal", ("dense", 0, None)),
    (mask_and(Causal(0), PAD), "dense-padding", ("dense", 0, (2, 1, 1, 64))),  # a per-key shift: no L x L mask
    (Window(15, 0), "dense", ("dense", None, (64, 64))),  # an added mask: materialised once, as a shift
    # a masked_fill chain: its scores materialised and filled as eager does (no kernel op: exact for Inf keys)
    (Window(15, 0), "dense-replacing", None),
    (Window(15, 0), "block-sparse", ("sparse", Window(15, 0).expr())),  # planned for CUDA, run on CPU tensors
])
@torch.no_grad()
def test_runtime_executes_the_planned_variant(monkeypatch, mask, variant, launched):
    op = "masked_fill" if variant == "dense-replacing" else "add"
    variant = variant.replace("-replacing", "")
    plan = plan_site(_spec(mask, device="cuda" if variant == "block-sparse" else "cpu"), parse("auto"))
    assert plan.variant == variant
    static = mask.parts[0] if hasattr(mask, "parts") else mask
    padded = PAD in getattr(mask, "parts", ())
    masks = (KernelMask(static, 0 if padded else None, KeyPadding(0, 64) if padded else None, -math.inf, op),)
    site = AttentionKernel(plan, [Scale(0.25), ProvedMask(0)], ((), (), ()), (0.0, "const"), {}, 2, "site",
                           masks=masks)
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 64, 16, generator=g), torch.randn(2, 2, 64, 16, generator=g), \
        torch.randn(2, 2, 64, 16, generator=g)
    attn_mask = torch.ones(2, 64, dtype=torch.long)
    attn_mask[1, 40:] = 0
    calls = _Calls(monkeypatch)
    out = site(q, k, v, *((attn_mask,) if padded else ()))
    assert calls.log == ([] if launched is None else [launched])
    i = torch.arange(64)
    visible = torch.as_tensor(eval_mask(static, i))
    if padded:
        visible = visible & attn_mask.bool()[:, None, None, :]
    assert rel_err(out, _reference(q, k, v, visible, 0.25)) <= 1e-5


def eval_mask(static, i):
    from attncomp.masks.blocks import dense_keep

    return dense_keep(static.expr(), len(i), len(i), "cpu")


@torch.no_grad()
def test_runtime_executes_the_planned_decode(monkeypatch):
    """A window ending at the last key, 4 queries against 512 keys: the decode kernel, with the window
    and the split count the passes chose, and the same result as the masked reference."""
    dims = Dims(1, 4, 2, 4, 512, 16, 16)
    plan = plan_site(_spec(Window(100, 508), dims=dims), parse("auto"))
    assert (plan.variant, plan.reduction) == ("decode", "split_kv")
    site = AttentionKernel(plan, [Scale(0.25), ProvedMask(0)], ((), (), ()), (0.0, "const"), {}, 2, "site",
                           masks=(KernelMask(Window(100, 508), None, None, -math.inf),))
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 4, 4, 16, generator=g), torch.randn(1, 2, 512, 16, generator=g), \
        torch.randn(1, 2, 512, 16, generator=g)
    calls = _Calls(monkeypatch)
    out = site(q, k, v)
    assert calls.log == [("decode", 608, plan.splits)]
    i, j = torch.arange(4)[:, None], torch.arange(512)[None, :]
    visible = (j <= i + 508) & (j >= i - 100)
    assert rel_err(out, _reference(q, k, v, visible, 0.25)) <= 1e-5
