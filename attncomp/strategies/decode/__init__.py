"""Split-KV decode: a short query block (``Lq <= 16``) against a long KV cache, contiguous or paged.

* ``op.py`` — ``attncomp::decode_fwd`` / ``attncomp::decode_paged_fwd`` (custom ops, fake impls, the
  CPU executor) and the Python entry points :func:`decode_attention`, :func:`paged_decode_attention`;
* ``launcher.py`` — the Triton launcher (FlashDecoding: split the key range, merge by LSE);
* ``plan.py`` — :func:`decode_splits`, how many splits a call is worth (for the planner);
* ``naive.py`` — the float64 reference.

Forward only: a decode site runs under ``torch.no_grad()`` in serving; training goes to dense.
"""

from attncomp.strategies.decode.op import decode_attention, paged_decode_attention
from attncomp.strategies.decode.plan import decode_splits

__all__ = ["decode_attention", "decode_splits", "paged_decode_attention"]
