"""attncomp — an attention compiler for PyTorch.

``attncomp.optimize(model)`` finds every attention site in a model's graph and runs it on
generated kernels; ``attncomp.explain(optimized)`` says what was found, replaced or left, and why.
"""

from .api import OptimizedModel, Report, explain, optimize
from .autotune import load_cache
from .ir import AttentionSpec, Plan
from .runtime import set_kernels
from .strategies import Auto, Dense, Linear, Local, Sparse, Strategy, Tensor

__all__ = ["optimize", "explain", "OptimizedModel", "Report", "AttentionSpec", "Plan", "Strategy", "Auto",
           "Dense", "Local", "Sparse", "Linear", "Tensor", "set_kernels", "load_cache"]
__version__ = "0.1.0"
