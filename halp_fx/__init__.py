"""halp_fx: HALP (High-Accuracy Low-Precision training) as FX graph passes, compiled with Inductor.

``halp_fx.transform(model, bits=8)`` returns a training step whose parameters
are float32 anchors plus integer offsets with one scale per tensor.
"""
import importlib.util
import os
import sys


def _passes_from_a_checkout():
    """``passes/`` sits at the top of the repository and is installed as ``halp_fx.passes``. In a checkout (also
    an editable install) the package has no ``passes`` folder of its own: the checkout's is loaded under that name."""
    package = os.path.dirname(os.path.abspath(__file__))
    folder = os.path.join(os.path.dirname(package), "passes")
    if os.path.isdir(os.path.join(package, "passes")) or not os.path.isfile(os.path.join(folder, "__init__.py")):
        return
    spec = importlib.util.spec_from_file_location(__name__ + ".passes", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    setattr(sys.modules[__name__], "passes", module)


_passes_from_a_checkout()

from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .errors import (CaptureError, NonFiniteError, PassError, SaturationWarning, ShapeWarning,  # noqa: E402
                     SmallBatchWarning)
from .training_step import TrainingStep  # noqa: E402
from .transform import transform  # noqa: E402

__all__ = ["transform", "TrainingStep", "NonFiniteError", "SaturationWarning", "SmallBatchWarning", "ShapeWarning",
           "CaptureError", "PassError", "save_checkpoint", "load_checkpoint"]
__version__ = "0.1.0"
