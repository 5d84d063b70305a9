"""What halp_fx raises and warns, defined in one place so every module can name them."""


class CaptureError(RuntimeError):
    """The model's training step could not be traced into a graph."""


class NonFiniteError(FloatingPointError):
    """A step's loss, corrected gradient or new state, or a full gradient, was NaN or infinite; no state changed."""


class PassError(RuntimeError):
    """A graph pass could not run: its precondition failed, or it raised; the message names the pass."""


class SaturationWarning(UserWarning):
    """Many offsets sat at the integer bounds: the grid is too fine for the steps taken (mu or lr too large)."""


class SmallBatchWarning(UserWarning):
    """A much smaller batch reached a model with batch-norm layers: its statistics are noisy enough to derail SVRG."""


class ShapeWarning(UserWarning):
    """Batches of many different shapes: each new shape captures and compiles a program of its own."""
