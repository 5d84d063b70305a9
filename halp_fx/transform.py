"""``halp_fx.transform``: the one call that turns a model into a compiled HALP training step."""
import torch

from . import arguments
from .capture import signature_of
from .training_step import TrainingStep


def transform(model, bits=8, *, loss_fn=None, data_loader=None, lr=0.01, T=None, mu=0.1, momentum=0.0,
              weight_decay=0.0, rounding="stochastic", compile=True, on_nonfinite="raise", seed=0,
              saturation_warning=0.1):
    """Capture ``model``'s training step, rewrite it into HALP and compile it.

    Args:
        model: an ``nn.Module``. Its trainable parameters are taken over by the
            returned step; read them back with ``step.weights()`` or
            ``step.sync_model()``.
        bits: offset width, 2..32 (int8 offsets up to 8, int16 up to 16, else
            int32), or ``None`` for full-precision SVRG through the same graphs.
        loss_fn: ``loss_fn(model(*batch[:-1]), batch[-1])``; with ``None`` the
            model's forward takes the whole batch and returns the scalar loss.
        data_loader: batches for the full gradient. The step recenters on its
            first call and then every ``T`` steps (``T=None``: ``len(data_loader)``).
            Without one, the first call recenters on its own batch, and later
            recenters happen every ``T`` steps on the current batch (if ``T`` is
            set) or when you call ``step.recenter(batches)``.
        lr, mu, momentum, weight_decay, rounding: as in the HALP paper; see
            :mod:`halp_fx.bit_centering` for the exact arithmetic.
        compile: compile the graphs with Inductor; ``False`` runs the same graphs eagerly.
        on_nonfinite: ``"raise"`` a :class:`NonFiniteError` or ``"skip"`` a step
            whose loss or corrected gradient is NaN/Inf; either way no state changes.
        seed: start of the stochastic-rounding counter.
        saturation_warning: at each recenter, warn (:class:`SaturationWarning`)
            when a tensor ended the epoch with more than this fraction of its
            offsets at the integer bounds.

    Returns:
        a :class:`halp_fx.training_step.TrainingStep`; ``step(*batch)`` runs one
        inner step and returns the loss.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    bits = arguments.check_bits(bits)
    lr = arguments.check_positive("lr", lr)
    mu = arguments.check_positive("mu", mu)
    T = arguments.check_T(T)
    momentum = arguments.check_momentum(momentum)
    weight_decay = arguments.check_weight_decay(weight_decay)
    rounding = arguments.check_rounding(rounding)
    on_nonfinite = arguments.check_choice("on_nonfinite", on_nonfinite, arguments.ON_NONFINITE)
    data_loader = arguments.check_data_loader(data_loader)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 31:
        raise ValueError(f"seed must be an int in [0, 2**31); got {seed!r}")
    if not isinstance(saturation_warning, (int, float)) or not 0 < saturation_warning <= 1:
        raise ValueError(f"saturation_warning must be a fraction in (0, 1]; got {saturation_warning!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(output, target), or None; got {type(loss_fn).__name__}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False; got {compile!r}")
    arguments.check_parameters(model.named_parameters())
    batch_size = None
    if data_loader is not None:
        batch_size = len(arguments.as_batch(next(iter(data_loader))))
    return TrainingStep(model, loss_fn, data_loader, bits=bits, lr=lr, T=T, mu=mu, momentum=momentum,
                        weight_decay=weight_decay, rounding=rounding, compile=compile,
                        on_nonfinite=on_nonfinite, seed=seed, batch_size=batch_size,
                        saturation_warning=saturation_warning)
