"""Checks of the hyperparameters and the model, shared by ``transform`` and the optimizers.

Each failure is a ``ValueError`` or ``TypeError`` that names the argument, the
value it got and the values it allows.
"""
import math
import numbers

import torch

from .bit_centering import ROUNDINGS

ON_NONFINITE = ("raise", "skip")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_bits(bits):
    if bits is None:
        return None
    if not _is_int(bits):
        raise TypeError(f"bits must be an int from 2 to 32, or None for full-precision SVRG; got {bits!r}")
    if not 2 <= bits <= 32:
        raise ValueError(f"bits must be from 2 to 32, or None for full-precision SVRG; got {bits}")
    return int(bits)


def check_positive(name, value):
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


def check_momentum(momentum):
    if not _is_real(momentum) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be a number in [0, 1); got {momentum!r}")
    return float(momentum)


def check_weight_decay(weight_decay):
    if not _is_real(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0; got {weight_decay!r}")
    return float(weight_decay)


def check_T(T, allow_none=True):
    if T is None and allow_none:
        return None
    if not _is_int(T) or T < 1:
        raise ValueError(f"T (inner steps between recenters) must be an int >= 1"
                         f"{' or None for len(data_loader)' if allow_none else ''}; got {T!r}")
    return int(T)


def check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
    return value


def check_rounding(rounding):
    return check_choice("rounding", rounding, ROUNDINGS)


def check_data_loader(data_loader):
    if data_loader is None:
        return None
    try:
        length = len(data_loader)
    except TypeError:
        raise TypeError("data_loader must be a sized iterable of batches (a torch.utils.data.DataLoader "
                        f"or a list of batches); got {type(data_loader).__name__} without len()") from None
    if length == 0:
        raise ValueError("data_loader is empty: the full gradient needs at least one batch")
    return data_loader


def check_parameters(named_parameters, owner="model"):
    """The trainable parameters must be floating point, real and on one device."""
    trainable = [(n, p) for n, p in named_parameters if p.requires_grad]
    if not trainable:
        raise ValueError(f"the {owner} has no trainable parameters (none with requires_grad=True): "
                         "there is nothing to train")
    for name, p in trainable:
        if not p.dtype.is_floating_point or p.is_complex():
            raise TypeError(f"parameter {name!r} has dtype {p.dtype}; HALP trains floating-point "
                            "parameters only (set requires_grad=False on it, or make it a buffer)")
    devices = {p.device for _, p in trainable}
    if len(devices) > 1:
        raise ValueError(f"the {owner}'s parameters are on several devices ({', '.join(sorted(map(str, devices)))}); "
                         "move the model to one device first, e.g. model.to('cuda')")
    return trainable


def as_batch(batch):
    """A batch as a tuple of tensors: a tensor, or a tuple/list of tensors."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(t, torch.Tensor) for t in batch):
        return tuple(batch)
    raise TypeError("a batch must be a tensor or a tuple/list of tensors (inputs..., target); "
                    f"got {_describe(batch)}")


def _describe(batch):
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of ({', '.join(type(t).__name__ for t in batch)})"
    return type(batch).__name__
