"""halp_fx: HALP (High-Accuracy Low-Precision training) as FX graph passes, compiled with Inductor.

``halp_fx.transform(model, bits=8)`` returns a training step whose parameters
are float32 anchors plus integer offsets with one scale per tensor.
"""
import importlib.util

if importlib.util.find_spec(__name__ + ".passes") is None:   # the top-level passes/, mapped in by pyproject.toml
    raise ImportError("halp_fx.passes is the top-level passes/ folder, which installing maps into the package: "
                      "install the checkout (pip install -e .) rather than importing halp_fx from its folder")

from .checkpoint import load_checkpoint, save_checkpoint
from .errors import (CaptureError, NonFiniteError, PassError, SaturationWarning, ShapeWarning,
                     SmallBatchWarning)
from .training_step import TrainingStep
from .transform import transform

__all__ = ["transform", "TrainingStep", "NonFiniteError", "SaturationWarning", "SmallBatchWarning", "ShapeWarning",
           "CaptureError", "PassError", "save_checkpoint", "load_checkpoint"]
__version__ = "0.1.0"
