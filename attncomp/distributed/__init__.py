"""Context parallelism over ``torch.distributed``: ring attention on sequence shards.

``ring_attention(q, k, v, mask=..., group=..., layout=...)`` runs attention over a sequence sharded
across a process group; ``shard`` / ``unshard`` move tensors between full and per-rank form;
``shard_positions`` gives a shard's global position ids. See :mod:`.ring` and :mod:`.schedule`.
"""

from dataclasses import dataclass

import torch.distributed as dist

from attncomp import ir
from attncomp.distributed.comm import traffic
from attncomp.distributed.layout import LAYOUTS, check_layout_name, shard, shard_positions, unshard
from attncomp.distributed.ring import ring_attention

__all__ = ["LAYOUTS", "ContextParallel", "ring_attention", "shard", "shard_positions", "traffic", "unshard"]

RING_MASKS = (ir.Full, ir.Causal, ir.Window, ir.BlockDiagonal)  # what ring_attention takes, over global positions


@dataclass(frozen=True)
class ContextParallel:
    """``optimize(model, context_parallel=...)``: every replaced site runs as :func:`ring_attention` over
    ``group`` (None: the default group), its q / k / v this rank's shard in ``layout``."""

    group: object = None
    layout: str = "contiguous"

    def __post_init__(self):
        check_layout_name(self.layout)

    @classmethod
    def of(cls, value) -> "ContextParallel | None":
        """What a user passes: None (off), True (the default group), a process group, or a ContextParallel."""
        if value is None or value is False:
            return None
        if isinstance(value, cls):
            return value
        if value is True:
            return cls()
        if isinstance(value, dist.ProcessGroup):
            return cls(value)
        raise TypeError(f"context_parallel must be None, True, a torch.distributed ProcessGroup or "
                        f"attncomp.distributed.ContextParallel(group, layout); got {type(value).__name__}")

    def run(self, q, k, v, mask, scale: float):
        """The site's attention as ring attention (the kernels' 4-D q, k, v)."""
        return ring_attention(q, k, v, mask=mask, scale=scale, group=self.group, layout=self.layout)
