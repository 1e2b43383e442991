"""Context parallelism over ``torch.distributed``: ring attention on sequence shards.

``ring_attention(q, k, v, mask=..., group=..., layout=...)`` runs attention over a sequence sharded
across a process group; ``shard`` / ``unshard`` move tensors between full and per-rank form;
``shard_positions`` gives a shard's global position ids. See :mod:`.ring` and :mod:`.schedule`.
"""

from .comm import traffic
from .layout import LAYOUTS, shard, shard_positions, unshard
from .ring import ring_attention

__all__ = ["LAYOUTS", "ring_attention", "shard", "shard_positions", "traffic", "unshard"]
