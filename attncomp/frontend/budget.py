"""A time budget for capture: Dynamo's compiles during one call of an optimized model.

``attncomp.optimize(model, capture_budget=S)`` (or ``ATTNCOMP_CAPTURE_BUDGET=S`` in the environment;
default :data:`DEFAULT_S`; ``inf`` for none): when the Dynamo compiles that one call of the
optimized model triggers (tracing and attncomp's rewrite, summed over the call's graphs) take
longer than ``S`` seconds, the capture is abandoned and the model runs as written, with one warning
and the reason in ``explain``.

How a compile is bounded:

* Dynamo's compile callbacks (``torch._dynamo.callback.callback_handler``'s start / end) time
  each compile of the thread that is inside :func:`watch`, and arm a watchdog timer for the budget
  left.
* When the timer fires while that thread is still tracing (Dynamo's bytecode interpreter is on its
  stack and it is not inside Dynamo's compile callbacks), :class:`CaptureBudgetExceeded` is raised
  in it asynchronously (``PyThreadState_SetAsyncExc``, as Ctrl-C would be): the trace stops
  within a few bytecodes, wherever Dynamo is (a long symbolic-shape computation included).
  It derives from ``BaseException`` so that Dynamo's ``except Exception`` handlers (which would turn
  it into a graph break) let it through to attncomp.
* Otherwise (the thread is elsewhere in the compile) the watchdog retries every
  :data:`RETRY_S`, and :func:`check` — called by attncomp's backend before and after each rewrite —
  raises it synchronously; a budget spent by a call that still finished is seen by
  :meth:`Watch.exceeded` afterwards. An exception raised asynchronously but not yet delivered when
  the compile ends is withdrawn by the end callback.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

ENV = "ATTNCOMP_CAPTURE_BUDGET"
DEFAULT_S = 120.0
RETRY_S = 0.05  # watchdog retry while the compiling thread is outside tracing


class CaptureBudgetExceeded(BaseException):  # noqa: N818 -- named for what happened, like KeyboardInterrupt
    """A capture ran past its time budget (raised inside Dynamo's compile, caught by attncomp)."""


def resolve(seconds: float | None) -> float:
    """The budget in seconds: ``seconds`` if given, else ``$ATTNCOMP_CAPTURE_BUDGET``, else
    :data:`DEFAULT_S`; ``inf`` means no budget. Raises ``ValueError`` for anything not > 0."""
    source = "capture_budget"
    if seconds is None:
        raw = os.environ.get(ENV)
        if raw is None:
            return DEFAULT_S
        source = ENV
        try:
            seconds = float(raw)
        except ValueError:
            raise ValueError(f"{ENV} must be a number of seconds (or 'inf'), got {raw!r}") from None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"{source} must be a number of seconds > 0 (or inf for none), got {seconds!r}")
    return float(seconds)


def reason(seconds: float) -> str:
    """The explain line of an abandoned capture."""
    return (f"capture abandoned: Dynamo's compiles for one call took longer than the capture budget of "
            f"{seconds:g} s (optimize(capture_budget=...) or ${ENV}); the model runs as written (eagerly)")


@dataclass
class Watch:
    """The compile time of one call of an optimized model, on one thread."""

    budget: float
    thread: int
    spent: float = 0.0  # finished compiles of this call, seconds
    started: float | None = None  # the running compile's start (perf_counter), if any
    timer: threading.Timer | None = None
    fired: bool = False  # the budget ran out while a compile was running
    injected: bool = False  # CaptureBudgetExceeded was raised asynchronously in the thread

    def elapsed(self) -> float:
        now = time.perf_counter()
        return self.spent + (now - self.started if self.started is not None else 0.0)

    def exceeded(self) -> bool:
        return self.fired or self.elapsed() > self.budget


_local = threading.local()
_lock = threading.Lock()


@contextlib.contextmanager
def watch(seconds: float) -> Iterator[Watch | None]:
    """Time the Dynamo compiles this thread runs inside the block against ``seconds``."""
    if math.isinf(seconds):
        yield None
        return
    _install()
    outer = getattr(_local, "watch", None)
    w = _local.watch = Watch(seconds, threading.get_ident())
    try:
        yield w
    finally:
        _disarm(w)
        _local.watch = outer


def check() -> None:
    """Raise :class:`CaptureBudgetExceeded` when the watched call of this thread is over budget
    (attncomp's backend calls this around each rewrite: a safe point inside the compile)."""
    w = getattr(_local, "watch", None)
    if w is not None and w.exceeded():
        w.fired = True
        raise CaptureBudgetExceeded


def _install() -> None:
    """Register the compile callbacks (again after ``torch._dynamo.reset()``, which clears them); on
    a torch without them only :func:`check` bounds a capture."""
    import torch._dynamo.callback as cb

    handler = getattr(cb, "callback_handler", None)
    if handler is None or not hasattr(handler, "start_callbacks"):
        return
    if _on_start not in handler.start_callbacks:
        handler.register_start_callback(_on_start)
    if _on_end not in handler.end_callbacks:
        handler.register_end_callback(_on_end)


def _on_start(*_args) -> None:
    w = getattr(_local, "watch", None)
    if w is None:
        return
    with _lock:
        w.started = time.perf_counter()
        _arm(w, max(w.budget - w.spent, 0.0))


def _on_end(*_args) -> None:
    w = getattr(_local, "watch", None)
    if w is None or w.started is None:
        return
    try:
        with _lock:
            w.spent += time.perf_counter() - w.started
            w.started = None
            if w.timer is not None:
                w.timer.cancel()
                w.timer = None
            if w.injected:  # not delivered yet (the trace ended first): it must not land after the compile
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(w.thread), None)
    except CaptureBudgetExceeded:
        pass  # delivered here, inside Dynamo's callback bookkeeping: the call sees ``w.fired``


def _arm(w: Watch, delay: float) -> None:
    """(under ``_lock``) a watchdog for the running compile, ``delay`` seconds from now."""
    if w.timer is not None:
        w.timer.cancel()
    w.timer = threading.Timer(delay, _fire, (w,))
    w.timer.daemon = True
    w.timer.start()


def _disarm(w: Watch) -> None:
    with _lock:
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        w.started = None


def _fire(w: Watch) -> None:
    """Watchdog: stop the compile if it is still tracing, else try again shortly."""
    with _lock:
        if w.started is None or w.timer is None:
            return  # the compile ended meanwhile
        w.fired = True
        if _tracing(w.thread):
            exc = ctypes.py_object(CaptureBudgetExceeded)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(w.thread), exc)
            w.injected, w.timer = True, None
        else:
            _arm(w, RETRY_S)


def _tracing(thread: int) -> bool:
    """``thread`` runs Dynamo's bytecode interpreter and is not inside Dynamo's compile callbacks
    (whose bookkeeping must not be interrupted)."""
    frame = sys._current_frames().get(thread)
    inside = False
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if name.endswith("_dynamo/callback.py"):
            return False
        inside = inside or name.endswith("_dynamo/symbolic_convert.py")
        frame = frame.f_back
    return inside
