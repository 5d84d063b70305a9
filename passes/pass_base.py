"""What every HALP pass shares: a ``torch.fx`` ``PassBase`` that states what it needs and what it guarantees,
checks both, and names itself in errors."""
from torch.fx.passes.infra.pass_base import PassBase

from halp_fx.errors import PassError
from halp_fx.roles import OUTPUT_ROLES, Role, role_of

# Roles a step holds once (``(Role.LR, None)``); every other role is held once per trainable tensor.
STEP_WIDE = (Role.LOSS, Role.LR, Role.ROUNDING_KEYS, Role.ALL_FINITE)


def _names(graph_module, role, where):
    """The names that carry ``role`` among the graph's nodes (``where="node"``) or its outputs (``"output"``)."""
    if where == "node":
        return {role_of(n)[1] for n in graph_module.graph.nodes if role_of(n)[0] is role}
    out = next(n for n in graph_module.graph.nodes if n.op == "output")
    return {name for kind, name in out.meta.get(OUTPUT_ROLES, ()) if kind is role}


class HalpPass(PassBase):
    """A pass with a ``name`` (its stage in ``step.graphs``), what it ``needs`` and what it ``guarantees``.

    ``needs``: the roles that must be in the graph before it runs, each with the pass that puts it there.
    ``guarantees``: ``(role, "node" | "output")`` pairs that hold after it runs, for every trainable tensor (a
    step-wide role such as ``Role.LR`` once); ``leaves_no``: the same pairs that no longer exist after it (the
    captured gradients once they are corrected). Both are checked on the graph it returns: a pass that breaks
    its promise raises :class:`halp_fx.PassError` naming it, not a wrong step later.
    """

    name = None
    needs = ()        # ((role, pass that produces it), ...)
    guarantees = ()   # ((role, "node" | "output"), ...)
    leaves_no = ()    # ((role, "node" | "output"), ...)

    def __call__(self, graph_module):
        self.requires(graph_module)
        result = self.call(graph_module)
        self.ensures(result.graph_module)
        return result

    def requires(self, graph_module):
        present = {role_of(n)[0] for n in graph_module.graph.nodes}
        for node in graph_module.graph.nodes:
            if node.op == "output":
                present.update(kind for kind, _ in node.meta.get(OUTPUT_ROLES, ()))
        for role, producer in self.needs:
            if role not in present:
                raise PassError(f"pass {self.name} needs {producer} to run before it: the graph has no "
                                f"{role.value} nodes. Run the passes in the order of halp_fx.passes.halp_passes()")

    def ensures(self, graph_module):
        trainable = _names(graph_module, Role.ANCHOR, "node") or _names(graph_module, Role.PARAM, "node")
        for role, where in self.guarantees:
            expected = {None} if role in STEP_WIDE else trainable
            missing = expected - _names(graph_module, role, where)
            if missing:
                raise PassError(f"pass {self.name} guarantees a {role.value} {where} for "
                                f"{'the step' if role in STEP_WIDE else 'every trainable tensor'}, and the graph "
                                f"it made has none for {sorted(map(str, missing))}")
        for role, where in self.leaves_no:
            left = _names(graph_module, role, where)
            if left:
                raise PassError(f"pass {self.name} guarantees no {role.value} {where} is left, and the graph it "
                                f"made still has them for {sorted(map(str, left))}")
