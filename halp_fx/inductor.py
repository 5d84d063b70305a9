"""Compiling a captured graph with Inductor, so that a second process finds it in Inductor's cache.

``compile_fx`` looks a graph up in its FX graph cache only when the example
inputs come with a shape environment (otherwise it logs "No shape env" and
compiles from scratch every time, and a warm first call costs nearly as much as
a cold one). The graphs here have static shapes, so the inputs are handed over
as fake tensors of a fake mode that has one, inside a tracing context.
"""
import copy

import torch


def compile_graph(gm, example_inputs):
    """``(compiled callable, Inductor's output code or None)`` for ``gm`` on inputs like ``example_inputs``."""
    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.utils import run_and_get_code
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    fakes = [fake_mode.from_tensor(t, static_shapes=True) for t in example_inputs]
    with tracing(TracingContext(fake_mode)):
        # compile_fx rewrites the module's codegen in place: give it a copy.
        compiled, codes = run_and_get_code(lambda: compile_fx(copy.deepcopy(gm), fakes))
    return compiled, "\n\n".join(codes) or None
