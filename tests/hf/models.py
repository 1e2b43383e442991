"""Tiny random-weight transformers models shared by the tests in tests/hf (no downloads)."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

VOCAB = 128
SMALL = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=128,
             vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def config(kind: str, **over):
    """A tiny config of ``kind`` (llama, mistral, qwen2, gpt2, gemma2) with eager attention."""
    t = transformers
    if kind == "gpt2":
        return t.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=512, attn_pdrop=0.0,
                            resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                            attn_implementation="eager", **over)
    if kind == "llama":
        return t.LlamaConfig(**SMALL, attn_implementation="eager", **over)
    if kind == "mistral":  # every layer a causal sliding window of 8 keys
        return t.MistralConfig(**{**SMALL, "sliding_window": 8, **over}, attn_implementation="eager")
    if kind == "qwen2":  # layer 0 full, layer 1 a sliding window of 8 keys
        return t.Qwen2Config(**{**SMALL, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
                                **over}, attn_implementation="eager")
    if kind == "gemma2":  # alternating sliding (8) / full layers; soft-capped scores (cap 1 at init range 0.2:
        # dropping the cap changes the logits by 48%)
        return t.Gemma2Config(**{**SMALL, "head_dim": 16, "sliding_window": 8, "attn_logit_softcapping": 1.0,
                                 "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16, "initializer_range": 0.2,
                                 **over},
                              attn_implementation="eager")
    raise ValueError(kind)


def causal_lm(kind: str, **over):
    """``AutoModelForCausalLM`` of :func:`config` (eval mode, random weights from the current seed)."""
    return transformers.AutoModelForCausalLM.from_config(config(kind, **over)).eval()


def with_impl(model, impl: str):
    """A deep copy of ``model`` (same weights, own config) running ``attn_implementation=impl``."""
    twin = copy.deepcopy(model)
    twin.set_attn_implementation(impl)
    assert twin.config._attn_implementation == impl
    return twin


def batch(B: int = 2, L: int = 20, pad: int = 5, side: str = "left", seed: int = 0):
    """Token ids ``(B, L)`` and attention mask: row 1 has ``pad`` padding tokens on ``side``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if pad:
        if side == "left":
            mask[1, :pad] = 0
        else:
            mask[1, L - pad:] = 0
        ids[mask == 0] = 0
    return ids, mask


class AttncompCalls(TorchDispatchMode):
    """Counts attncomp's custom ops by name and query length (axis 2 of q)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "attncomp" and func._opname != "dense_fwd":
            self.calls.append((func._opname, args[0].shape[2]))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        # the dense path is entered through attncomp.strategies.dense.op.run, which calls the custom op
        # under autograd and its CPU executor directly in inference: count the entries there
        from attncomp.strategies.dense import op as dense_op

        self._run = run = dense_op.run

        def counted(q, *args, **kwargs):
            self.calls.append(("dense_fwd", q.shape[2]))
            return run(q, *args, **kwargs)

        dense_op.run = counted
        return super().__enter__()

    def __exit__(self, *exc):
        from attncomp.strategies.dense import op as dense_op

        dense_op.run = self._run
        return super().__exit__(*exc)

    def count(self, name: str, Lq: int | None = None) -> int:
        return sum(1 for n, lq in self.calls if n == name and (Lq is None or lq == Lq))
