"""What every HALP pass shares: a ``torch.fx`` ``PassBase`` that states its precondition and names itself in errors."""
from torch.fx.passes.infra.pass_base import PassBase

from halp_fx.errors import PassError
from halp_fx.roles import role_of


class HalpPass(PassBase):
    """A pass with a ``name`` (its stage in ``step.graphs``) and ``needs``: the roles that must be in the graph
    before it runs, each with the pass that puts it there."""

    name = None
    needs = ()  # ((role, pass that produces it), ...)

    def requires(self, graph_module):
        present = {role_of(n)[0] for n in graph_module.graph.nodes}
        for node in graph_module.graph.nodes:
            if node.op == "output":
                present.update(kind for kind, _ in node.meta.get("halp_output_roles", ()))
        for role, producer in self.needs:
            if role not in present:
                raise PassError(f"pass {self.name} needs {producer} to run before it: the graph has no "
                                f"{role.value} nodes. Run the passes in the order of halp_fx.passes.halp_passes()")
