"""The model view behind ``OptimizedModel``'s attribute passthrough (``fast.generate``, ``fast.config``, …).

``attncomp.optimize`` returns an ``OptimizedModel`` wrapping a clone of the user's model. Attributes the
wrapper does not have are looked up on a *view*: an instance of a subclass of the model's own class
that shares the clone's ``__dict__`` (its submodules, parameters, config, training flag, hooks: one
state, no copy) and differs in one thing: calling it (``view(...)``, ``view.forward(...)``) runs the
optimized model. So a method such as transformers' ``generate``, which calls ``self(**inputs)``,
reaches attncomp's compiled forward, and ``self.model``, ``self.config``, ``self.device`` inside it mean
what they mean for the original model. The subclass keeps the class's name and module (so
``save_pretrained`` writes the original architecture name) and the original ``forward`` signature
(``generate`` inspects it).

transformers' own ``torch.compile`` of the forward during ``generate`` (StaticCache on CUDA) is turned
off on the view: the forward is already compiled by attncomp, and compiling the wrapper again would
trace attncomp's runner with another backend.
"""

from __future__ import annotations

import functools
import weakref

from torch import nn

_CLASSES: dict[type, type] = {}
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # owner -> its view (the view holds the owner weakly)


def _owner(view):
    owner = view._attncomp_owner()
    if owner is None:
        raise RuntimeError("attncomp: the optimized model this view belongs to no longer exists")
    return owner


def view_class(cls: type) -> type:
    """The subclass of ``cls`` whose instances call their attncomp owner (cached per class)."""
    if cls in _CLASSES:
        return _CLASSES[cls]

    def __call__(self, *args, **kwargs):
        return _owner(self)(*args, **kwargs)

    @functools.wraps(cls.forward)  # inspect.signature(view.forward) gives the model's own parameters
    def forward(self, *args, **kwargs):
        return _owner(self)(*args, **kwargs)

    def _valid_auto_compile_criteria(self, *args, **kwargs):
        return False

    body = {"__slots__": ("_attncomp_owner",), "__call__": __call__, "forward": forward,
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
            "_attncomp_view": True}
    if hasattr(cls, "_valid_auto_compile_criteria"):  # transformers' generation mixin
        body["_valid_auto_compile_criteria"] = _valid_auto_compile_criteria
    sub = type(cls.__name__, (cls,), body)
    _CLASSES[cls] = sub
    return sub


def view_of(owner: nn.Module, inner: nn.Module) -> nn.Module:
    """The view of ``inner`` (the model ``owner`` wraps): an instance of ``type(inner)``'s view class
    sharing ``inner``'s state; calling it calls ``owner``. One per owner, made on first use and kept
    outside the owner (a copy or pickle of the owner makes its own)."""
    view = _VIEWS.get(owner)
    if view is None or view.__dict__ is not inner.__dict__:
        view = object.__new__(view_class(type(inner)))
        object.__setattr__(view, "__dict__", inner.__dict__)
        object.__setattr__(view, "_attncomp_owner", weakref.ref(owner))
        _VIEWS[owner] = view
    return view
