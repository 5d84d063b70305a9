"""halp_fx: HALP (High-Accuracy Low-Precision training) as FX graph passes, compiled with Inductor.

``halp_fx.transform(model, bits=8)`` returns a training step whose parameters
are float32 anchors plus integer offsets with one scale per tensor.
"""
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import (CaptureError, NonFiniteError, PassError, SaturationWarning, ShapeWarning,
                     SmallBatchWarning)
from .training_step import TrainingStep
from .transform import transform

__all__ = ["transform", "TrainingStep", "NonFiniteError", "SaturationWarning", "SmallBatchWarning", "ShapeWarning",
           "CaptureError", "PassError", "save_checkpoint", "load_checkpoint"]
__version__ = "0.1.0"
