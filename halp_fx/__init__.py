"""halp_fx: HALP (High-Accuracy Low-Precision training) as FX graph passes, compiled with Inductor.

``halp_fx.transform(model, bits=8)`` returns a training step whose parameters
are float32 anchors plus integer offsets with one scale per tensor.
"""
from .capture import CaptureError
from .checkpoint import load_checkpoint, save_checkpoint
from .training_step import NonFiniteError, SaturationWarning, TrainingStep
from .transform import transform

__all__ = ["transform", "TrainingStep", "NonFiniteError", "SaturationWarning", "CaptureError",
           "save_checkpoint", "load_checkpoint"]
__version__ = "0.1.0"
