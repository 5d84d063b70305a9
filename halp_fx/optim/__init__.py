"""torchhalp-compatible optimizers: ``from halp_fx.optim import HALP, SVRG``.

They run the arithmetic of :mod:`halp_fx.bit_centering` as ordinary
``torch.optim`` optimizers over a closure, for training loops written for
torchhalp; :func:`halp_fx.transform` is the graph-based route to the same steps.
"""
from .halp import HALP, SVRG

__all__ = ["HALP", "SVRG"]
