"""The trainer's start-up savings (torch_backend/startup.py), each in a fresh interpreter: the collector held and then
frozen, and Inductor's kernel templates compiled on first use yet rendering as before.

bench/warm_start.py measures what they save; the compile-cache integration tests show warm starts still hit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any


def _fresh(code: str) -> Any:
    """Run `code` in a new interpreter; it prints one JSON value as its last line."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_collector_is_held_until_release_then_start_up_objects_are_frozen() -> None:
    got = _fresh("""
        import gc, json
        from llama3_hyperpod.torch_backend import startup
        startup.release_gc()  # nothing held yet: nothing frozen, the collector stays on
        before = [gc.isenabled(), gc.get_freeze_count()]
        startup.hold_gc()
        held = gc.isenabled()
        junk = [[i] for i in range(50_000)]
        startup.release_gc()
        startup.release_gc()  # a second release changes nothing
        print(json.dumps({"before": before, "held": held, "after": gc.isenabled(), "frozen": gc.get_freeze_count()}))
    """)
    assert got["before"] == [True, 0]
    assert got["held"] is False
    assert got["after"] is True
    assert got["frozen"] >= 50_000


def test_a_collector_the_caller_turned_off_stays_off() -> None:
    got = _fresh("""
        import gc, json
        from llama3_hyperpod.torch_backend import startup
        gc.disable()
        startup.hold_gc()
        startup.release_gc()
        print(json.dumps([gc.isenabled(), gc.get_freeze_count()]))
    """)
    assert got == [False, 0]


def test_kernel_templates_compile_on_first_use_and_render_as_before() -> None:
    got = _fresh("""
        import json
        import torch
        from llama3_hyperpod.torch_backend import startup
        deferred = startup.defer_kernel_templates()
        again = startup.defer_kernel_templates()
        from torch._inductor.codegen.common import KernelTemplate
        from torch._inductor.select_algorithm import TritonTemplate
        import torch._inductor.kernel  # noqa: F401  (makes the mm, bmm and flex-attention templates)
        templates = list(TritonTemplate.all_templates.values())
        uncompiled = sum(t.template._template is None for t in templates)
        source = "{{ name }}: {{ body | indent_except_first(1) }}"
        text = KernelTemplate._template_from_string(source).render(name="k", body="a\\nb")
        first = templates[0]
        first.template.render  # first use compiles it
        import jinja2
        print(json.dumps({"deferred": deferred, "again": again, "templates": len(templates),
                          "uncompiled": uncompiled, "text": text,
                          "compiled_on_use": isinstance(first.template._template, jinja2.Template)}))
    """)
    assert got["deferred"] is True and got["again"] is True
    assert got["templates"] >= 10
    assert got["uncompiled"] == got["templates"]  # none compiled at import
    assert got["text"] == "k: a\n    b"
    assert got["compiled_on_use"] is True


def test_too_late_once_the_templates_exist() -> None:
    got = _fresh("""
        import json
        import torch._inductor.select_algorithm  # noqa: F401
        from llama3_hyperpod.torch_backend import startup
        print(json.dumps(startup.defer_kernel_templates()))
    """)
    assert got is False
