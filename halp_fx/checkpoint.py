"""Checkpoints written atomically: a crash mid-write never leaves a truncated file in place."""
import os
import tempfile

import torch


def save_checkpoint(state, path):
    """``torch.save(state, path)`` through a temporary file in the same folder, fsynced, then renamed over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".checkpoint-", dir=directory)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def load_checkpoint(path, map_location=None):
    """``torch.load(path, weights_only=True)``: a checkpoint holds tensors and plain numbers only."""
    return torch.load(path, map_location=map_location, weights_only=True)
