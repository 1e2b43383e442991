"""attncomp — an attention compiler for PyTorch.

``attncomp.optimize(model)`` finds every attention site in a model's graph and runs it on
generated kernels; ``attncomp.explain(optimized)`` says what was found, replaced or left, and why.
The submodules the README documents as attributes (``attncomp.ops.attention``,
``attncomp.tensor_lowrank.lowrank_tensor_attention``, …) import on first use.
"""

import importlib

from attncomp import hf
from attncomp.api import OptimizedModel, Report, explain, optimize
from attncomp.ir import AttentionSpec, Plan
from attncomp.runtime.autotune import load_cache
from attncomp.runtime.device import set_kernels
from attncomp.strategies import Auto, Dense, Linear, Local, Sparse, Strategy, Tensor

__all__ = ["optimize", "explain", "OptimizedModel", "Report", "AttentionSpec", "Plan", "Strategy", "Auto",
           "Dense", "Local", "Sparse", "Linear", "Tensor", "set_kernels", "load_cache"]
__version__ = "0.1.0"

# attn_implementation="attncomp" in transformers: registered when transformers' modules are imported
# (an import hook; transformers itself is not imported here), or explicitly by attncomp.hf.register()
hf.install_hook()

# Submodules reachable as ``attncomp.<name>`` after a plain ``import attncomp``. They are imported
# on first access (PEP 562 module ``__getattr__``) rather than here: ``import attncomp`` stays as
# cheap as the public API above needs, and a user who never calls an op never loads it. The list is
# explicit (not "any submodule") so that ``attncomp.cli`` or ``attncomp.__main__`` never run by
# accident and a typo still raises ``AttributeError``.
# short names for the modules the README documents (each strategy's op lives in its own folder)
LAZY_SUBMODULES = {"ops": "ops", "ir": "ir", "linear": "strategies.linear.op", "tensor": "strategies.tensor.op",
                   "tensor_lowrank": "strategies.tensor.lowrank", "routing": "strategies.sparse.routing",
                   "sparse": "strategies.sparse.op", "blocks": "masks.blocks", "autotune": "runtime.autotune",
                   "distributed": "distributed"}


def __getattr__(name: str):
    if name in LAZY_SUBMODULES:
        module = importlib.import_module(f"{__name__}.{LAZY_SUBMODULES[name]}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(LAZY_SUBMODULES))
