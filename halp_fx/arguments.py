"""Checks of the hyperparameters and the model, shared by ``transform`` and the optimizers.

Each failure is a ``ValueError`` or ``TypeError`` that names the argument, the
value it got and the values it allows.
"""
import math
import numbers

import torch

from .bit_centering import ROUNDINGS

ON_NONFINITE = ("raise", "skip")
ARITHMETICS = ("fp32", "int8")
ANCHOR_PRECISIONS = ("fp32", "bf16")


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


_FLOAT32 = torch.finfo(torch.float32)


def check_positive(name, value, alternative=""):
    """A finite number > 0 that float32 holds as such: the step computes with it in float32, where 1e39 would
    be infinite and 1e-46 zero. ``alternative`` names what else the argument allows, for the message."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0{alternative}; got {value!r}")
    if not _FLOAT32.tiny <= value <= _FLOAT32.max:
        raise ValueError(f"{name} must be a finite number > 0 that float32 can hold (from {_FLOAT32.tiny:.3g} to "
                         f"{_FLOAT32.max:.3g}){alternative}; got {value!r}")
    return float(value)


AUTO_MU = "auto"


def check_mu(mu):
    """A finite number > 0 (see :func:`check_positive`), or ``"auto"`` (the runtime chooses each tensor's mu at
    every recenter, :func:`halp_fx.auto_mu.next_mus`)."""
    if isinstance(mu, str) and mu == AUTO_MU:
        return AUTO_MU
    return check_positive("mu", mu, alternative=" or 'auto'")


def check_seed(seed):
    if not _is_int(seed) or not 0 <= seed < 2 ** 31:
        raise ValueError(f"seed must be an int in [0, 2**31); got {seed!r}")
    return int(seed)


def check_saturation_warning(saturation_warning):
    if not _is_real(saturation_warning) or not 0 < saturation_warning <= 1:
        raise ValueError(f"saturation_warning must be a fraction in (0, 1]; got {saturation_warning!r}")
    return float(saturation_warning)


def check_compile(compile):
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False; got {compile!r}")
    return compile


def check_count(name, value):
    """A counter read from a state dict: an int >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"state dict entry {name!r} must be an int >= 0; got {value!r}")
    return int(value)


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
    for name, p in trainable:
        if p.device.type == "meta":
            raise ValueError(f"parameter {name!r} is on the meta device: it has no values to train. Materialize "
                             "the model first (model.to_empty(device='cpu') and initialize it, or load a state dict)")
    return trainable


def check_float32_parameters(trainable, owner="model"):
    """transform() trains float32 models: its anchors, full gradients and graphs are float32."""
    for name, p in trainable:
        if p.dtype != torch.float32:
            raise TypeError(f"parameter {name!r} of the {owner} has dtype {p.dtype}; halp_fx.transform trains "
                            "float32 models (the anchor, full gradient and step are float32). Convert it with "
                            "model.float() and feed float32 batches")


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


def check_transform_arguments(bits, lr, mu, T, momentum, weight_decay, rounding, on_nonfinite, data_loader, seed,
                              saturation_warning, loss_fn, compile, arithmetic="fp32", anchor_precision="fp32"):
    """Every argument of ``transform`` but the model, checked, as a dict of their normalized values."""
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(output, target), or None; got {type(loss_fn).__name__}")
    return dict(bits=check_bits(bits), lr=check_positive("lr", lr), mu=check_mu(mu), T=check_T(T),
                momentum=check_momentum(momentum), weight_decay=check_weight_decay(weight_decay),
                rounding=check_rounding(rounding), on_nonfinite=check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE),
                data_loader=check_data_loader(data_loader), seed=check_seed(seed),
                saturation_warning=check_saturation_warning(saturation_warning), loss_fn=loss_fn, compile=check_compile(compile),
                arithmetic=check_arithmetic(arithmetic, bits),
                anchor_precision=check_anchor_precision(anchor_precision, arithmetic))


def check_arithmetic(arithmetic, bits):
    check_choice("arithmetic", arithmetic, ARITHMETICS)
    if arithmetic == "int8" and bits is None:
        raise ValueError("arithmetic='int8' needs a bits value: with bits=None (full-precision SVRG) there are no "
                         "integer offsets to center the products on; pass bits=8 or arithmetic='fp32'")
    return arithmetic



def check_anchor_precision(anchor_precision, arithmetic):
    check_choice("anchor_precision", anchor_precision, ANCHOR_PRECISIONS)
    if anchor_precision == "bf16" and arithmetic != "int8":
        raise ValueError("anchor_precision='bf16' needs arithmetic='int8': a bf16 anchor is exact enough only where the "
                         "products at W are built on it (centered int8 products); pass arithmetic='int8' too, or "
                         "anchor_precision='fp32'")
    return anchor_precision
