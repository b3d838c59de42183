"""Two fixed costs of a trainer process's start that a warm first step (every graph from the cache) does not need.

- The cyclic garbage collector. Importing torch, Dynamo and Inductor leaves about 600,000 objects that live as long
  as the process, and each of the collector's full passes rescans all of them: on the 2-core CI machine its passes
  during start-up cost about 0.5-1 s. Start-up makes little cyclic garbage, so the trainer holds the collector
  until its first step and then freezes what start-up allocated (`gc.freeze`: never rescanned) before enabling it:
  the step loop collects as before, without rescanning the imports.
- Inductor's Triton kernel templates. torch 2.13.0 compiles about 20 Jinja templates when
  `torch._inductor.select_algorithm` is first imported (`TritonTemplate.__init__`, select_algorithm.py:2567, via
  `KernelTemplate._template_from_string`, codegen/common.py:2522), which `compile_fx` does on every start, CPU or
  not: about 0.3 s. They are used only when Inductor generates a template kernel (max-autotune, GPU matmuls), never
  when it loads a graph from the cache, so each is compiled on first use instead.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

_gc_held: set[str] = set()  # {"held"} between hold_gc and release_gc


def hold_gc() -> None:
    """Called first thing in a trainer process (before torch's import); `release_gc` ends it."""
    if gc.isenabled():
        gc.disable()
        _gc_held.add("held")


def release_gc() -> None:
    """Before the first step: what start-up allocated is frozen out of later passes, and the collector runs again."""
    if "held" in _gc_held:
        _gc_held.clear()
        gc.freeze()
        gc.enable()


class _DeferredTemplate:
    """A Jinja template compiled from its source on first use; every attribute then comes from the compiled one."""

    def __init__(self, source: str, compile_source: Callable[[str], Any]) -> None:
        self._source = source
        self._compile = compile_source
        self._template: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_source", "_compile", "_template"):
            raise AttributeError(name)  # copy/pickle probe dunders before __init__ ran: no recursion
        if self._template is None:
            self._template = self._compile(self._source)
            if self._template is None:
                raise AttributeError(f"{name} (no jinja2 to compile a kernel template)")
        return getattr(self._template, name)


def defer_kernel_templates() -> bool:
    """Make Inductor compile its kernel templates on first use; False (nothing changed) when this torch differs.

    Must run before `torch._inductor.select_algorithm` is imported (its templates are made at import).
    """
    import sys

    from torch._inductor.codegen import common

    template_class = getattr(common, "KernelTemplate", None)
    compile_source = getattr(template_class, "_template_from_string", None)
    if template_class is None or not callable(compile_source):
        return False
    if getattr(compile_source, "l3hp_deferred", False):
        return True
    if "torch._inductor.select_algorithm" in sys.modules:
        return False  # too late: its templates exist already

    def deferred(source: str) -> Any:
        return _DeferredTemplate(source, compile_source)

    deferred.l3hp_deferred = True  # type: ignore[attr-defined]
    template_class._template_from_string = staticmethod(deferred)
    return True
