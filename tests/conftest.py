import os

# Triton kernels run on CPU tensors through Triton's interpreter in the tests. Triton reads this
# when triton.language is first imported (torch._dynamo imports it), so it is set before torch.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# No autotuning unless a test asks for it (heuristic configs keep the suite fast); tuned entries
# never go to the user's cache file.
os.environ.setdefault("ATTNCOMP_AUTOTUNE", "0")
os.environ.setdefault("ATTNCOMP_AUTOTUNE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache",
                                                              "attncomp-autotune.json"))
os.environ.setdefault("ATTNCOMP_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache",
                                                         "attncomp-kernels"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def tiny_gpt2(n_layer: int = 2, impl: str = "eager", **config):
    """transformers' GPT-2 with random weights: 4 heads of 16, vocabulary 128, no dropout; ``config``
    overrides any other GPT2Config field (e.g. ``use_cache=False``)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=4, n_embd=64, vocab_size=128, n_positions=64,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation=impl, **config)
    return transformers.GPT2Model(cfg)


def random_qkv_dout(c, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random q ``(B, Hq, Lq, D)``, k ``(B, hkv, lk, D)``, v ``(B, hkv, lk, dv)`` and dout
    ``(B, Hq, Lq, dv)`` in ``c.dtype`` for a test case ``c``; ``c.strided``: (B, L, H, D) storage
    seen as (B, H, L, D)."""

    def bhld(h, length, d):
        if c.strided:
            return torch.randn(c.B, length, h, d, generator=g).to(c.dtype).transpose(1, 2)
        return torch.randn(c.B, h, length, d, generator=g).to(c.dtype)

    return bhld(c.Hq, c.Lq, c.D), bhld(c.hkv, c.lk, c.D), bhld(c.hkv, c.lk, c.dv), bhld(c.Hq, c.Lq, c.dv)


def assert_fwd_bwd_match(out, lse, grads, ref_out, ref_lse, leaves, inputs, bias, b64, tol: float) -> None:
    """Kernel outputs against a float64 reference: ``out`` / ``lse`` (same -inf rows), and the
    gradients ``grads = (dq, dk, dv, dbias)`` against ``leaves``' (q, k, v) and ``b64``'s ``.grad``
    (``dbias`` must be None when ``b64`` is None or needs no grad); shapes, dtypes and strides of
    dq, dk, dv follow ``inputs`` (q, k, v). Relative errors above ``tol`` (or NaN) fail."""
    dq, dk, dv, dbias = grads
    errs = {"out": rel_err(out, ref_out.detach())}
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~finite), "lse -inf pattern differs"
    if finite.any():
        errs["lse"] = rel_err(lse[finite], ref_lse[finite].detach())
    for name, got, leaf, x in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves, inputs):
        assert got.shape == leaf.shape and got.dtype == x.dtype and got.stride() == x.stride(), name
        errs[name] = rel_err(got, leaf.grad)
    if b64 is not None and b64.requires_grad:
        assert dbias.shape == bias.shape and dbias.dtype == bias.dtype
        errs["dbias"] = rel_err(dbias, b64.grad)
    else:
        assert dbias is None
    bad = {n: e for n, e in errs.items() if not e <= tol}  # NaN (unwritten poison) fails too
    assert not bad, f"relative errors above {tol:g}: {bad} (all: {errs})"


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield


@pytest.fixture
def triton_kernels():
    """Run attncomp's ops on the generated Triton kernels (Triton's interpreter on CPU tensors)."""
    import attncomp

    attncomp.set_kernels("triton")
    yield
    attncomp.set_kernels(None)


@pytest.fixture
def torch_kernels():
    """Run attncomp's ops on the torch executors."""
    import attncomp

    attncomp.set_kernels("torch")
    yield
    attncomp.set_kernels(None)


@pytest.fixture
def tune_env(tmp_path, monkeypatch):
    """Autotuning on, cache file in a fresh tmp dir, in-memory state and counters cleared."""
    from attncomp.runtime import autotune

    path = tmp_path / "autotune.json"
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE", "1")
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE_CACHE", str(path))
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE_REPS", "2")
    monkeypatch.setenv("ATTNCOMP_AUTOTUNE_QUIET", "1")
    monkeypatch.delenv("ATTNCOMP_AUTOTUNE_LOAD", raising=False)
    autotune.reset()
    yield path
    autotune.reset()
