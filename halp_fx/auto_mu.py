"""``mu="auto"``: the controller that moves each tensor's mu at every recenter, from the telemetry of the epoch
that ends there (saturation and underflow), and its constants.

From 8 bits up each tensor moves on its own (:func:`next_mu`); below 8 bits the tensors of a width move together
(:func:`band_factor`), and the first epoch is cut by early recenters (:data:`PROBES`, read by
:func:`halp_fx.recenter.recenter_due`). :mod:`halp_fx.recenter` calls :func:`next_mus`; nothing here changes
state.
"""
import logging

import torch

from . import bit_centering

log = logging.getLogger("halp_fx")

# mu="auto": each tensor's mu moves by one factor per recenter, from the telemetry of the epoch that ends there.
AUTO_MU_FACTOR = 2.0
AUTO_MU_BOUNDS = (0.25, 64.0)
# From 8 bits up, each tensor on its own (next_mu): coarsen when more than a quarter of its offsets sit at the
# bounds ...
SATURATED_ABOVE = 0.25
# ... refine when at most 5% do and more than 90% of its steps were below half a grid step. Not half: gradients
# are heavy-tailed, so on a good grid most entries of a large tensor still take sub-grid steps (the char LSTM's
# output layer at its best mu, 1 at 8 bits: 50-76%), and refining it there costs perplexity.
REFINE_SATURATED_AT_MOST = 0.05
UNDERFLOW_ABOVE = 0.9
# Below 8 bits, all tensors of a width together (band_factor): at every example's best 4-bit grid 95-99% of the
# steps fall below half a grid step (docs/examples.md, "The telemetry at fixed mus"); refine above the band,
# coarsen below it.
BAND_BELOW_BITS = 8
UNDERFLOW_BAND = (0.95, 0.99)
# ... and, so that the first epoch is not spent on the default grid, PROBES more recenters early in the first
# epoch, each after 1/PROBE_FRACTION of T steps.
PROBES, PROBE_FRACTION = 3, 8


def first_mu(bits):
    """The first epoch's mu under ``mu="auto"``: 1 from 8 bits up, doubled for every 2 bits fewer (4 at 4 bits),
    within :data:`AUTO_MU_BOUNDS`. A coarser grid needs a larger mu before any step survives rounding."""
    if bits is None:
        return 1.0
    return min(2.0 ** max(0, (8 - bits) // 2), AUTO_MU_BOUNDS[1])


def uses_band(bits):
    """Whether ``mu="auto"`` at ``bits`` uses the band rule and its early recenters (below 8 bits)."""
    return bits is not None and bits < BAND_BELOW_BITS


def next_mu(mu, saturated, underflow):
    """The rule of ``mu="auto"`` from 8 bits up, applied to each tensor at every recenter after the first.

    ``saturated`` is the fraction of the tensor's offsets at the integer bounds just before the recenter,
    ``underflow`` the mean over the epoch's steps of the fraction of its entries whose step ``|lr*u/d|`` was below
    half a grid step (``None`` when no step ran since the last recenter: mu stays). Saturated offsets say the grid
    is too fine for the steps taken: mu is halved. Steps lost in rounding with nothing clipped say it is too
    coarse: mu is doubled. Otherwise it stays; always within :data:`AUTO_MU_BOUNDS`.
    """
    if underflow is None:
        return mu
    if saturated > SATURATED_ABOVE:
        return _moved(mu, 1 / AUTO_MU_FACTOR)
    if saturated <= REFINE_SATURATED_AT_MOST and underflow > UNDERFLOW_ABOVE:
        return _moved(mu, AUTO_MU_FACTOR)
    return mu


def band_factor(saturated, underflow):
    """The move of ``mu="auto"`` below 8 bits, from the size-weighted ``saturated`` and ``underflow`` of all the
    tensors of one width: halve mu when more than a quarter of the offsets are saturated or fewer than 95% of the
    steps underflow (the grid is finer than the best grids run); double it when more than 99% underflow and at most
    5% are saturated (coarser); else keep it. Returns the factor."""
    if saturated > SATURATED_ABOVE or underflow < UNDERFLOW_BAND[0]:
        return 1 / AUTO_MU_FACTOR
    if saturated <= REFINE_SATURATED_AT_MOST and underflow > UNDERFLOW_BAND[1]:
        return AUTO_MU_FACTOR
    return 1.0


def _moved(mu, factor):
    low, high = AUTO_MU_BOUNDS
    return min(max(mu * factor, low), high)


def underflow_fractions(underflow_sums, steps):
    """Each tensor's underflow, the mean over ``steps`` steps, from its running sum (0-d tensors): a list of floats."""
    return (torch.stack(list(underflow_sums)).double() / steps).tolist()


def next_mus(mus, offsets, underflow_sums, steps, bits):
    """Every tensor's mu for a recenter, from its offsets and its underflow sum over the ``steps`` steps since the
    last one (none: the mus stay). ``bits`` is one value per tensor; a tensor with ``bits=None`` keeps its mu. From 8
    bits up each tensor moves by :func:`next_mu`; the tensors of a width below 8 move together by
    :func:`band_factor` of their telemetry, weighted by size."""
    if steps == 0:
        return list(mus)
    underflows = underflow_fractions(underflow_sums, steps)
    out = list(mus)
    for b in {b for b in bits if b is not None}:
        group = [i for i, bb in enumerate(bits) if bb == b]
        saturated = bit_centering.saturated_fractions([offsets[i] for i in group], b).tolist()
        if uses_band(b):
            sizes = [offsets[i].numel() for i in group]
            factor = band_factor(_weighted(saturated, sizes), _weighted([underflows[i] for i in group], sizes))
            for i in group:
                out[i] = _moved(mus[i], factor)
        else:
            for i, s in zip(group, saturated):
                out[i] = next_mu(mus[i], s, underflows[i])
    return out


def _weighted(values, sizes):
    return sum(v * n for v, n in zip(values, sizes)) / max(sum(sizes), 1)


def log_telemetry(names, numels, bits, epoch, next_mus, norms, recenter=None):
    """One DEBUG record of the ``halp_fx`` logger per recenter of a HALP step (SVRG writes none). Per tensor: its
    ``numel`` and ``bits``, the ending epoch's ``mu``, ``saturated`` and ``underflow`` (``epoch``: the caller's
    ``stats()`` rows; ``None`` at the first recenter, which ends no epoch), the ``next_mu`` this recenter applies
    and the new ``full_grad_norm``. The record's ``halp_telemetry`` attribute holds them as
    ``{"recenter": k (0 at the first), "tensors": {name: {...}}}``, for tools. Callers check ``log.isEnabledFor(DEBUG)``
    first: ``epoch`` costs a read of every offset."""
    fields = ("mu", "saturated", "underflow")
    epoch = [dict.fromkeys(fields)] * len(names) if epoch is None else epoch
    tensors = {name: {"numel": numel, "bits": b, **{key: row.get(key) for key in fields}, "next_mu": next_mu,
                      "full_grad_norm": norm}
               for name, numel, b, row, next_mu, norm in zip(names, numels, bits, epoch, next_mus,
                                                              torch.stack(list(norms)).tolist())}

    def fraction(x):
        return "-" if x is None else f"{x:.3f}"
    log.debug("halp_fx: recenter%s: %s", "" if recenter is None else f" {recenter}",
              "; ".join(f"{name} mu {t['next_mu']} (epoch's mu {t['mu']}, saturated {fraction(t['saturated'])}, "
                        f"underflow {fraction(t['underflow'])})" for name, t in tensors.items()),
              extra={"halp_telemetry": {"recenter": recenter, "tensors": tensors}})
