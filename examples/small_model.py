"""Small model factories for the ``attncomp`` command line (and its tests).

    attncomp inspect --model examples.small_model:gpt2_tiny --shapes "B=1,L=64"
    attncomp tune    --model examples.small_model:gpt2_tiny --shapes "B=1,L=16..64" --out cache.json

A factory takes no arguments and returns either a module, or ``(module, make_inputs)`` where
``make_inputs(B, L)`` returns the tuple of positional inputs for batch ``B`` and length ``L``.
Random weights, no downloads.
"""

from __future__ import annotations

import torch
from torch import nn


def gpt2_tiny(n_layer: int = 2, n_positions: int = 8192) -> tuple[nn.Module, object]:
    """A GPT-2-shaped transformers model: ``n_layer`` layers, 2 heads, hidden 32, eager attention.

    Inputs: ``input_ids`` (B, L) int64, L <= ``n_positions`` (GPT-2's learned position table; the
    default covers the README's ``attncomp tune --shapes "B=1,L=512..8192"``). A longer L is
    rejected by the model (``IndexError`` in the position embedding)."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_head=2, n_embd=32, vocab_size=64, n_positions=n_positions, attn_pdrop=0.0,
                     resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     attn_implementation="eager")
    model = GPT2Model(cfg).eval()

    def make_inputs(B: int, L: int) -> tuple[torch.Tensor]:
        return (torch.randint(0, cfg.vocab_size, (B, L)),)

    return model, make_inputs


def vit_tiny() -> tuple[nn.Module, object]:
    """timm ``vit_tiny_patch16_224`` with 2 blocks on 64x64 images (17 tokens: L is fixed, ``L`` is
    ignored). Inputs: images (B, 3, 64, 64) float32."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, depth=2, img_size=64).eval()

    def make_inputs(B: int, L: int) -> tuple[torch.Tensor]:
        return (torch.randn(B, 3, 64, 64),)

    return model, make_inputs
