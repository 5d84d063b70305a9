"""Small graph-editing tools the passes share: find nodes by role or target, add inputs, insert calls.

New nodes get their ``meta["val"]`` from the graph's own fake mode (the one
``make_fx`` traced it with), by running the inserted function on the fake
values of its arguments.
"""
import torch

from halp_fx.capture import input_name
from halp_fx.roles import OUTPUT_ROLES, ROLE, role_of


def fake_mode_of(graph):
    """The fake mode that made the graph's ``meta["val"]`` tensors."""
    values = [n.meta["val"] for n in find_nodes(graph, "placeholder") if "val" in n.meta]
    detect = getattr(torch._guards, "detect_fake_mode", None)
    mode = detect(values) if detect is not None else None
    return mode if mode is not None else values[0].fake_mode


def find_nodes(graph, op, target=None):
    """``graph.find_nodes(op=, target=)`` where torch has it (2.4+), the same by a scan elsewhere."""
    if hasattr(graph, "find_nodes"):
        return list(graph.find_nodes(op=op, target=target) if target is not None else graph.find_nodes(op=op))
    return [n for n in graph.nodes if n.op == op and (target is None or n.target == target)]


def nodes_with_role(graph, kind):
    """``{name: node}`` for the nodes (placeholders or computed) whose role is ``(kind, name)``."""
    return {role_of(n)[1]: n for n in graph.nodes if role_of(n)[0] == kind}


def placeholders(graph, kind):
    """``{name: node}`` for the placeholders whose role is ``(kind, name)``."""
    return {role_of(n)[1]: n for n in find_nodes(graph, "placeholder") if role_of(n)[0] == kind}


def _reachable(roots, neighbours):
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(neighbours(node))
    return seen


def ancestors(nodes):
    """``nodes`` and every node they are computed from."""
    return _reachable(nodes, lambda node: node.all_input_nodes)


def descendants(nodes):
    """``nodes`` and every node computed from them."""
    return _reachable(nodes, lambda node: node.users)


def output_node(graph):
    return find_nodes(graph, "output")[0]


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
    return next(n.meta["val"].device for n in find_nodes(graph, "placeholder") if "val" in n.meta)


def add_input(graph, role, shape, dtype, after=None):
    """A new placeholder named after its role, e.g. ``(ANCHOR, "fc.weight")`` -> ``anchor_fc_weight``."""
    last = after or find_nodes(graph, "placeholder")[-1]
    with graph.inserting_after(last):
        node = graph.placeholder(input_name(role))
    node.meta[ROLE] = role
    with fake_mode_of(graph):
        node.meta["val"] = torch.empty(shape, dtype=dtype, device=device_of(graph))
    return node


def insert_call(graph, fn, args, kwargs, before, name, role=None):
    """Insert one node ``name = fn(*args, **kwargs)`` before node ``before``.

    ``fn`` is one of :mod:`halp_fx.bit_centering`'s functions, so the graph reads
    as the algorithm; Inductor traces through it when it compiles.
    """
    def value(a):
        return a.meta["val"] if isinstance(a, torch.fx.Node) else a
    with fake_mode_of(graph):
        result = fn(*[value(a) for a in args], **{k: value(v) for k, v in kwargs.items()})
    with graph.inserting_before(before):
        node = graph.create_node("call_function", fn, tuple(args), dict(kwargs), name=name)
    node.meta["val"] = result
    if role is not None:
        node.meta[ROLE] = role
    return node


def finish(gm):
    """What every pass ends with: drop dead nodes, check the graph, regenerate the code."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def stable_topological_sort(graph):
    """Reorder ``graph`` so every node follows its inputs, moving as little as possible: a node that a pass made
    depend on a later one (the pass at W reading the anchor pass's product) pulls that node and whatever it needs
    up to just before itself; everything else keeps its place."""
    done = set()
    for node in list(graph.nodes):
        if node in done:
            continue
        stack = [(node, iter(node.all_input_nodes))]
        while stack:
            current, inputs = stack[-1]
            for arg in inputs:
                if arg not in done:
                    stack.append((arg, iter(arg.all_input_nodes)))
                    break
            else:
                stack.pop()
                if current is not node:
                    node.prepend(current)
                done.add(current)
