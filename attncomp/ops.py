"""Attention ops you can call directly: masked (block-sparse) attention, the local family, content
routing, linear and tensor attention. Each lives with its strategy (``attncomp/strategies/<name>/``);
this module gathers them as the public ``attncomp.ops``.

All ops are differentiable. ``attention`` and the local family are exact: they compute the same
numbers as dense attention with the equivalent boolean mask, visiting only the tiles the mask leaves
(``attncomp::sparse_fwd``; on CUDA generated Triton kernels, on CPU the block-gathering torch executor).
"""

from attncomp.strategies.linear.op import linear_attention
from attncomp.strategies.local.op import (
    block_attention,
    grid_attention,
    halo_attention,
    neighborhood_attention,
    neighborhood_mask,
)
from attncomp.strategies.sparse.masked import attention, choose_blocks, default_blocks
from attncomp.strategies.sparse.routing import routed_attention
from attncomp.strategies.tensor.op import tensor_attention

__all__ = ["attention", "neighborhood_attention", "neighborhood_mask", "block_attention", "grid_attention",
           "halo_attention", "default_blocks", "choose_blocks", "routed_attention", "linear_attention",
           "tensor_attention"]
