"""transformers integration: ``attn_implementation="attncomp"`` and the model view behind
``attncomp.optimize(hf_model).generate(...)``.

``import attncomp`` makes ``"attncomp"`` an attention implementation of transformers without importing
transformers: :func:`install_hook` registers it when transformers' ``modeling_utils`` /
``masking_utils`` are first imported (or at once if they already are). :func:`register` does the same
explicitly (and raises ``ImportError`` without transformers)::

    import attncomp
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attncomp")

The attention function (:mod:`attncomp.hf.attention`) runs attncomp's ops; the mask function
(:mod:`attncomp.hf.masks`) returns the mask as an IR description, never an ``(Lq, Lk)`` tensor.
"""

from __future__ import annotations

import importlib
import sys

from attncomp.hf.attention import attention_forward
from attncomp.hf.masks import mask_interface

NAME = "attncomp"
_ATTN, _MASKS = "transformers.modeling_utils", "transformers.masking_utils"


def _register_attention(module) -> None:
    module.AttentionInterface.register(NAME, attention_forward)


def _register_masks(module) -> None:
    module.AttentionMaskInterface.register(NAME, mask_interface)


_CALLBACKS = {_ATTN: _register_attention, _MASKS: _register_masks}


def register() -> None:
    """Register ``attn_implementation="attncomp"`` with transformers now (imports transformers).

    Raises ``ImportError`` if transformers is not installed."""
    try:
        modeling_utils = importlib.import_module(_ATTN)
        masking_utils = importlib.import_module(_MASKS)
    except ImportError as e:
        raise ImportError("attncomp.hf.register() needs transformers (pip install transformers)") from e
    _register_attention(modeling_utils)
    _register_masks(masking_utils)


def is_registered() -> bool:
    """Whether transformers (if imported) lists ``"attncomp"`` as attention and mask implementation."""
    mu, ma = sys.modules.get(_ATTN), sys.modules.get(_MASKS)
    return (mu is not None and ma is not None and NAME in mu.AttentionInterface._global_mapping
            and NAME in ma.AttentionMaskInterface._global_mapping)


class _Loader:
    """Runs the real loader, then the registration; the module keeps its own loader."""

    def __init__(self, loader, spec, callback):
        self.loader, self.spec, self.callback = loader, spec, callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.spec.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        self.callback(module)


class _Finder:
    """Watches for transformers' ``modeling_utils`` / ``masking_utils`` being imported (first in
    ``sys.meta_path``; any other module name is declined at once)."""

    def find_spec(self, name, path, target=None):
        callback = _CALLBACKS.get(name)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader, spec, callback)
        return spec


def install_hook() -> None:
    """Register ``"attncomp"`` with transformers whenever its modules are (or already were) imported.
    Idempotent; imports nothing of transformers itself."""
    for name, callback in _CALLBACKS.items():
        if name in sys.modules:
            callback(sys.modules[name])
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


__all__ = ["register", "install_hook", "is_registered", "NAME"]
