"""Compiling a captured graph with Inductor, so that a second process finds it in Inductor's caches.

``compile_fx`` looks a graph up in its FX graph cache only when the example
inputs come with a shape environment (otherwise it logs "No shape env" and
compiles from scratch every time, and a warm first call costs nearly as much as
a cold one). The graphs here have static shapes, so the inputs are handed over
as fake tensors of a fake mode that has one, inside a tracing context.

AOTAutograd's cache, one level up, refuses graphs that call Python functions,
such as the ``bit_centering`` calls the passes insert, because their code is
not part of its key. They are declared cacheable with a key that is a hash of
the source of the modules that define them, so an edit to the arithmetic
changes the key.
"""
import contextlib
import copy
import functools
import hashlib
import inspect
import sys

import torch
import torch._inductor.config


def compile_graph(gm, example_inputs):
    """``(compiled callable, Inductor's output code or None)`` for ``gm`` on inputs like ``example_inputs``."""
    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.utils import run_and_get_code
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    def compile_on(inputs):
        # compile_fx rewrites the module's codegen in place: give it a copy.
        compiled, codes = run_and_get_code(lambda: compile_fx(copy.deepcopy(gm), inputs))
        return compiled, "\n\n".join(codes) or None

    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    try:
        fakes = [fake_mode.from_tensor(t, static_shapes=True) for t in example_inputs]
    except TypeError:  # a torch whose from_tensor has no static_shapes=: compile without the FX graph cache
        return compile_on(list(example_inputs))
    with tracing(TracingContext(fake_mode)), _python_calls_cacheable(gm):
        return compile_on(fakes)


def _python_calls_cacheable(gm):
    """A config patch that lets AOTAutograd's cache take the graph's calls to halp_fx functions."""
    config = torch._inductor.config
    if not hasattr(config, "unsafe_marked_cacheable_functions"):  # torch < 2.6: no such cache
        return contextlib.nullcontext()
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    marked = {f"{t.__module__}.{t.__name__}": _source_key(t.__module__) for t in targets
              if getattr(t, "__module__", "").startswith("halp_fx.")}
    return config.patch(unsafe_marked_cacheable_functions={**config.unsafe_marked_cacheable_functions, **marked})


@functools.lru_cache(maxsize=None)
def _source_key(module_name):
    return hashlib.sha256(inspect.getsource(sys.modules[module_name]).encode()).hexdigest()
