"""The FX passes that turn a captured gradient graph into a HALP step, in the order they run.

Each pass is a ``torch.fx.passes.infra.pass_base.PassBase`` in a module of its
own whose docstring shows the graph before and after it. It states the roles
it needs in the graph (``needs``) and what the graph holds after it
(``guarantees``, ``leaves_no``); both are checked, so a pass run out of order
names the pass missing before it, and a pass that breaks its promise is named
at once. ``halp_passes`` is the one list of them; ``run_passes``
applies it and keeps a copy of the graph after every pass, so a reader can
follow the rewrite stage by stage.
"""
import copy
from collections import OrderedDict

from halp_fx.errors import PassError

from .all_reduce_pass import AllReducePass
from .anchor_constants_pass import AnchorConstantsPass
from .anchor_difference_pass import AnchorDifferencePass
from .bf16_anchor_pass import Bf16AnchorPass
from .centered_int8_pass import CenteredInt8Pass
from .dequantize_weights_pass import DequantizeWeightsPass
from .nonfinite_guard_pass import NonfiniteGuardPass
from .offset_update_pass import OffsetUpdatePass
from .svrg_correction_pass import SvrgCorrectionPass

__all__ = ["DequantizeWeightsPass", "SvrgCorrectionPass", "CenteredInt8Pass", "AnchorDifferencePass", "AllReducePass", "OffsetUpdatePass",
           "NonfiniteGuardPass", "Bf16AnchorPass", "AnchorConstantsPass", "halp_passes", "run_passes"]


def halp_passes(bits, rounding, momentum, weight_decay, arithmetic="fp32", anchor_precision="fp32", group=None,
                world_size=1, force_low_precision=False):
    """The HALP rewrite, in the order it runs. ``arithmetic="int8"`` adds ``centered_int8`` and
    ``anchor_difference`` (and ``bf16_anchor`` with ``anchor_precision="bf16"``), then ``anchor_constants`` last; a
    data-parallel step (``group``, a name from :func:`halp_fx.distributed.group_name`) adds ``all_reduce``.
    ``force_low_precision`` runs the int8 and bf16 products even where they do not pay (exactness checks; a
    step sets it from :func:`halp_fx.centered_int8.forced`)."""
    low = []
    if arithmetic == "int8":
        low = [CenteredInt8Pass(bits, always=force_low_precision), AnchorDifferencePass()]
        low += [Bf16AnchorPass(always=force_low_precision)] if anchor_precision == "bf16" else []
    all_reduce = [AllReducePass(group, world_size)] if group is not None else []
    hoist = [AnchorConstantsPass()] if arithmetic == "int8" else []
    return [DequantizeWeightsPass(bits), SvrgCorrectionPass(), *low, *all_reduce,
            OffsetUpdatePass(bits, rounding, momentum, weight_decay), NonfiniteGuardPass(), *hoist]


def run_passes(captured, passes):
    """Apply ``passes`` to a copy of ``captured``.

    Returns ``(stages, summaries)``: ``stages`` maps ``"captured"`` and then each
    pass's name to the graph module after it; ``summaries`` maps each pass's name
    to one line saying what it changed. A pass that fails raises
    :class:`halp_fx.PassError` naming it.
    """
    stages = OrderedDict(captured=captured)
    summaries = OrderedDict()
    gm = captured
    for graph_pass in passes:
        try:
            gm = graph_pass(copy.deepcopy(gm)).graph_module
        except PassError:
            raise
        except Exception as error:
            raise PassError(f"pass {graph_pass.name} failed: {type(error).__name__}: {error}") from error
        stages[graph_pass.name] = gm
        summaries[graph_pass.name] = graph_pass.summary()
    return stages, summaries
