"""Small graph-editing tools the passes share: find nodes by role, add inputs, inline traced code."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from halp_fx.capture import OUTPUT_ROLES, ROLE, identifier


def placeholders(graph, kind):
    """``{name: node}`` for the placeholders whose role is ``(kind, name)``."""
    return {n.meta[ROLE][1]: n for n in graph.nodes if n.op == "placeholder" and n.meta.get(ROLE, ("",))[0] == kind}


def output_node(graph):
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def outputs(graph, kind):
    """``{name: (position, value node)}`` for the output values whose role is ``(kind, name)``."""
    out = output_node(graph)
    return {role[1]: (i, value) for i, (role, value) in enumerate(zip(out.meta[OUTPUT_ROLES], out.args[0]))
            if role[0] == kind}


def set_output(graph, position, value, role):
    out = output_node(graph)
    values, roles = list(out.args[0]), list(out.meta[OUTPUT_ROLES])
    values[position], roles[position] = value, role
    out.args = (tuple(values),)
    out.meta[OUTPUT_ROLES] = roles


def append_output(graph, value, role):
    out = output_node(graph)
    out.args = (tuple(out.args[0]) + (value,),)
    out.meta[OUTPUT_ROLES] = list(out.meta[OUTPUT_ROLES]) + [role]


def device_of(graph):
    """The device the step runs on (placeholders added by passes only carry a meta-device shape)."""
    return next(n.meta["val"].device for n in graph.nodes
                if n.op == "placeholder" and "val" in n.meta and n.meta["val"].device.type != "meta")


def add_input(graph, role, shape, dtype, device, after=None):
    """A new placeholder named after its role, e.g. ``("anchor", "fc.weight")`` -> ``anchor_fc_weight``."""
    kind, name = role
    label = kind if name is None else f"{kind}_{identifier(name)}"
    last = after or [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        node = graph.placeholder(label)
    node.meta[ROLE] = role
    node.meta["val"] = torch.empty(shape, dtype=dtype, device="meta")
    return node


def insert_call(graph, fn, args, kwargs, before, name):
    """Insert one node ``name = fn(*args, **kwargs)`` before node ``before``.

    ``fn`` is one of :mod:`halp_fx.bit_centering`'s functions, so the graph reads
    as the algorithm; Inductor traces through it when it compiles. The node's
    ``meta["val"]`` (shape and dtype) comes from running ``fn`` once on fake
    tensors, which costs a fraction of tracing it.
    """
    device = device_of(graph)
    with FakeTensorMode():
        def value(a):
            if not isinstance(a, torch.fx.Node):
                return a
            val = a.meta["val"]
            return torch.empty(val.shape, dtype=val.dtype, device=device)
        result = fn(*[value(a) for a in args], **{k: value(v) for k, v in kwargs.items()})
    with graph.inserting_before(before):
        node = graph.call_function(fn, tuple(args), dict(kwargs))
    node.meta["val"] = result
    node._rename(name)
    return node


def finish(gm):
    """What every pass ends with: drop dead nodes, check the graph, regenerate the code."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
