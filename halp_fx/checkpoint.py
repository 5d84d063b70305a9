"""Checkpoints written atomically: a crash mid-write never leaves a truncated file in place."""
import glob
import os
import tempfile

import torch


def save_checkpoint(state, path):
    """``torch.save(state, path)`` through a temporary file in the same folder, fsynced, then renamed over ``path``.

    The file ends with the mode a plain ``torch.save(state, path)`` gives it (``0666`` less the umask), not the
    ``0600`` of the temporary. Temporaries of ``path`` left by an earlier save that was killed mid-write are
    removed first."""
    directory, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}.checkpoint-"
    for stale in glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + "*")):
        try:
            os.unlink(stale)
        except FileNotFoundError:  # another save of the same path removed it first
            pass
    handle, temporary = tempfile.mkstemp(prefix=prefix, dir=directory)
    try:
        with os.fdopen(handle, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _umask():
    # The umask can only be read by setting it; set it back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_checkpoint(path, map_location=None):
    """``torch.load(path, weights_only=True)``: a checkpoint holds tensors and plain numbers only."""
    return torch.load(path, map_location=map_location, weights_only=True)
