"""The FX passes that turn a captured plain SGD step into a HALP step, in the order they run.

Each pass is a ``torch.fx.passes.infra.pass_base.PassBase`` in a module of its
own whose docstring shows the graph before and after it. ``halp_passes`` is the
one list of them; ``run_passes`` applies it and keeps a copy of the graph after
every pass, so a reader can follow the rewrite stage by stage.
"""
import copy
from collections import OrderedDict

from .dequantize_weights_pass import DequantizeWeightsPass
from .nonfinite_guard_pass import NonfiniteGuardPass
from .offset_update_pass import OffsetUpdatePass
from .svrg_correction_pass import SvrgCorrectionPass

__all__ = ["DequantizeWeightsPass", "SvrgCorrectionPass", "OffsetUpdatePass", "NonfiniteGuardPass",
           "halp_passes", "run_passes"]


def halp_passes(bits, rounding, momentum, weight_decay):
    """The HALP rewrite, as ``(stage name, pass)`` pairs in the order they run."""
    return [
        ("dequantize_weights", DequantizeWeightsPass(bits)),
        ("svrg_correction", SvrgCorrectionPass()),
        ("offset_update", OffsetUpdatePass(bits, rounding, momentum, weight_decay)),
        ("nonfinite_guard", NonfiniteGuardPass()),
    ]


def run_passes(captured, passes):
    """Apply ``passes`` to a copy of ``captured``.

    Returns ``(stages, summaries)``: ``stages`` maps ``"captured"`` and then each
    pass's name to the graph module after it; ``summaries`` maps each pass's name
    to one line saying what it changed.
    """
    stages = OrderedDict(captured=captured)
    summaries = OrderedDict()
    gm = captured
    for name, graph_pass in passes:
        gm = graph_pass(copy.deepcopy(gm)).graph_module
        stages[name] = gm
        summaries[name] = graph_pass.summary()
    return stages, summaries
