"""The recenter, defined once for ``transform``'s step and for ``halp_fx.optim``.

``A <- W``; ``G`` = the mean gradient over the data at ``A``, each batch weighted
by its number of examples; ``d = ||G|| / (mu * (2**(bits-1) - 1))``; ``Z <- 0``.
With ``mu="auto"`` each tensor's mu is first moved by
:func:`halp_fx.auto_mu.next_mus` (the controller, a module of its own), and below 8 bits three more recenters come
early in the first epoch (:func:`recenter_due`).
The callers differ only in how they compute one batch's gradient (a compiled
graph, or the user's closure), which they pass in as ``gradient_of``.
"""
import logging
import math
import warnings

import torch

from . import bit_centering
from .arguments import as_batch
from .auto_mu import PROBE_FRACTION, PROBES
from .errors import NonFiniteError, SaturationWarning

log = logging.getLogger("halp_fx")


def examples_in(batch):
    """How many examples a batch holds: the first dimension of its first tensor."""
    return batch[0].shape[0] if batch[0].dim() else 1


def full_gradient(batches, gradient_of, reduce=None):
    """The example-weighted mean of ``gradient_of(batch)`` (a list of tensors) over ``batches``.

    Returns ``(mean gradients, their norms)``. A batch whose gradient is NaN or
    infinite raises :class:`NonFiniteError` naming its index: without a full
    gradient there is nothing to correct the steps with, so this is never skipped.
    ``reduce((sums, examples)) -> (sums, examples)`` combines the sums of several
    data-parallel ranks (:func:`halp_fx.distributed.sum_over_ranks`).
    """
    accumulators, flags, total = None, [], 0
    for raw in batches:
        batch = as_batch(raw)
        grads = gradient_of(batch)
        examples = examples_in(batch)
        if accumulators is None:
            accumulators = [torch.zeros_like(g, dtype=torch.float32) for g in grads]
        # One flag tensor per batch, read once at the end: no host sync per batch.
        flags.append(bit_centering.all_finite(*grads))
        torch._foreach_add_(accumulators, list(grads), alpha=examples)
        total += examples
    if reduce is not None:
        accumulators, total = reduce(accumulators, total)
    if total == 0:
        raise ValueError("the full gradient saw no batch: data_loader (or batches=) yielded nothing. A one-shot "
                         "iterable (a generator) is used up after one pass: pass a list of batches or a DataLoader")
    finite = torch.stack(flags)
    if not bool(finite.all()):
        index = int((~finite).nonzero()[0])
        raise NonFiniteError(f"the full gradient is NaN/Inf: batch {index} of the data loader gives a NaN/Inf "
                             "gradient at the current weights. The anchor, offsets and scales were not changed. "
                             "Check that batch for NaN/Inf (or the weights, if they diverged), or lower lr.")
    if reduce is not None and not bool(bit_centering.all_finite(*accumulators)):
        raise NonFiniteError("the full gradient is NaN/Inf: a batch of another rank's data loader gives a NaN/Inf "
                             "gradient (that rank's error names it). The anchor, offsets and scales were not changed.")
    torch._foreach_div_(accumulators, total)
    return accumulators, torch._foreach_norm(accumulators)


def recenter_due(steps_since_recenter, T, band, steps_taken):
    """Whether a step recenters before it runs: after ``T`` steps, and with ``band`` (``mu="auto"`` below 8 bits)
    also after ``ceil(T/8)`` while no more than ``PROBES * ceil(T/8)`` steps were taken in all. So the first epoch
    is cut by :data:`PROBES` early recenters, each of which may move mu; the later epochs are ``T`` steps long.
    ``steps_taken()`` (called only when needed: it may read a device) counts the committed steps since the first
    recenter (:func:`halp_fx.bit_centering.counter_steps` of the rounding counter), so a checkpoint needs no more
    state."""
    if steps_since_recenter >= T:
        return True
    if not band:
        return False
    every = math.ceil(T / PROBE_FRACTION)
    return steps_since_recenter >= every and steps_taken() <= PROBES * every


def recentered(weights, full_grads, norms, mus, bits):
    """Per tensor ``(anchor, offset, scale)`` after a recenter at ``weights`` (the current ``A + d*Z``).

    ``mus`` and ``bits`` hold one value per tensor (parameter groups may differ).
    """
    out = []
    for weight, grad, norm, mu, b in zip(weights, full_grads, norms, mus, bits):
        out.append((weight.to(torch.float32), torch.zeros_like(weight, dtype=bit_centering.offset_dtype(b)),
                    bit_centering.scale_from_norm(norm, mu, b)))
    return out


def saturated_fraction(offsets, bits):
    """The fraction of all offset entries, over every tensor, that sit at the integer bounds.

    Weighted by size, so a tiny bias whose few entries saturate does not speak
    for the whole model. ``bits`` is one value per tensor (``None``: no bounds).
    """
    counted = [(z, b) for z, b in zip(offsets, bits) if b is not None]
    if not counted:
        return 0.0
    saturated = total = 0.0
    for b in sorted({b for _, b in counted}):
        group = [z for z, bb in counted if bb == b]
        sizes = torch.tensor([z.numel() for z in group], dtype=torch.float64)
        fractions = bit_centering.saturated_fractions(group, b).to(torch.float64).cpu()
        saturated += float((fractions * sizes).sum())
        total += float(sizes.sum())
    return saturated / max(total, 1.0)


def warn_if_saturated(offsets, bits, threshold, stacklevel):
    """Warn (:class:`SaturationWarning`) when more than ``threshold`` of all offset entries sit at the bounds."""
    fraction = saturated_fraction(offsets, bits)
    if fraction > threshold:
        # The text does not change from epoch to epoch, so Python's default filter shows it once per call site
        # instead of at every recenter; stats() has the figures.
        warnings.warn(f"more than {threshold:.0%} of all offsets sit at their integer bounds: the grid is too fine "
                      "for the steps taken, and clipped updates are lost; lower mu or lr (stats() gives each "
                      "tensor's fraction)", SaturationWarning, stacklevel=stacklevel + 1)
    return fraction
