"""halp_fx: HALP (High-Accuracy Low-Precision training) as FX graph passes, compiled with Inductor.

``halp_fx.transform(model, bits=8)`` returns a training step whose parameters
are float32 anchors plus integer offsets with one scale per tensor.
"""
import importlib.util
import os


def _check_passes_are_this_checkouts():
    """``halp_fx.passes`` is the top-level ``passes/`` folder, which pyproject.toml maps into the package when it
    is installed. Fail at once, saying what to do, where that mapping is missing or points at another checkout."""
    spec = importlib.util.find_spec(__name__ + ".passes")
    if spec is None:
        raise ImportError("halp_fx.passes is the top-level passes/ folder, which installing maps into the package: "
                          "install the checkout (pip install -e .) rather than importing halp_fx from its folder")
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    own = os.path.join(checkout, "passes")
    found = os.path.dirname(os.path.abspath(spec.origin))
    if os.path.isfile(os.path.join(checkout, "pyproject.toml")) and os.path.isdir(own) and found != own:
        raise ImportError(f"halp_fx is imported from {checkout} but halp_fx.passes from {found}, another "
                          f"installation: install this checkout (pip install -e {checkout})")


_check_passes_are_this_checkouts()

from .checkpoint import load_checkpoint, save_checkpoint
from .errors import (CaptureError, NonFiniteError, PassError, SaturationWarning, ShapeWarning,
                     SmallBatchWarning)
from .training_step import TrainingStep
from .transform import transform

__all__ = ["transform", "TrainingStep", "NonFiniteError", "SaturationWarning", "SmallBatchWarning", "ShapeWarning",
           "CaptureError", "PassError", "save_checkpoint", "load_checkpoint"]
__version__ = "0.1.0"
