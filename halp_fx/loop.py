"""The HALP loop, written once: ``transform``'s step and ``halp_fx.optim``'s optimizers are adapters over it.

One inner step:

1. recenter first, at the first step and whenever one is due (:func:`~halp_fx.recenter.recenter_due`);
2. draw the step's rounding keys, one per trainable tensor, numbered in one order (frozen tensors take none);
3. run the route's two passes (at the anchor and at ``W``, from one random state) and its update;
4. take the results only when the step's all-finite flag is True. A bad step puts back what the passes
   touched (buffers such as BatchNorm running statistics), changes nothing else (weights, offsets, momentum,
   underflow sums, counters, the rounding counter), is counted in ``nonfinite_steps``, and raises
   :class:`~halp_fx.NonFiniteError` or is skipped (``on_nonfinite``).

One recenter: warn when too many offsets sat at their bounds, take the full gradient (the route keeps the
buffers), move each ``mu="auto"`` tensor's mu (:mod:`halp_fx.auto_mu`), log the telemetry, and put the anchor
at the current weights with a new grid (:func:`~halp_fx.recenter.recentered`).

A route says how to compute and where its state lives; it implements the methods under "the route" in
:class:`HalpLoop`. ``transform``'s :class:`~halp_fx.training_step.TrainingStep` runs compiled graphs and keeps
its state by role; :class:`halp_fx.optim.HALP` runs the user's closure and keeps ``torch.optim`` state.
"""
import contextlib
import logging
import os
import sys
from typing import Callable, NamedTuple

import torch

from . import arguments, bit_centering
from .auto_mu import first_mu, log_telemetry, next_mus, uses_band
from .errors import NonFiniteError
from .recenter import full_gradient, log, recenter_due, recentered, saturated_fraction, warn_if_saturated


class Outcome(NamedTuple):
    """What a route's step computed, not yet taken: ``commit()`` takes it, ``undo()`` puts back what the passes
    changed on their way (buffers)."""
    loss: torch.Tensor
    all_finite: torch.Tensor
    commit: Callable[[], None]
    undo: Callable[[], None]


class HalpLoop:
    """The HALP loop; see the module's docstring. A subclass is a route."""

    # -- the route -----------------------------------------------------------------------------------------
    # Attributes: T (None: no recenter of its own), on_nonfinite, saturation_warning.
    # Counters, read and written by the loop: rounding_counter, steps_since_recenter, recenters, nonfinite_steps.

    def _tensor_names(self):
        """The trainable tensors' names, in the order of the rounding keys."""
        raise NotImplementedError

    def _tensor_bits(self):
        """Each trainable tensor's ``bits`` (``None``: full precision)."""
        raise NotImplementedError

    def _tensor_mus(self):
        """Each trainable tensor's mu setting: a number, or ``"auto"``."""
        raise NotImplementedError

    def _tensor_state(self):
        """Per trainable tensor ``(offset, scale, the mu chosen at the last recenter or None, underflow sum)``."""
        raise NotImplementedError

    def _device(self):
        """The device of the trainable tensors (where the rounding keys go)."""
        raise NotImplementedError

    def _stochastic(self):
        """Whether any trainable tensor rounds stochastically (then the step needs rounding keys)."""
        raise NotImplementedError

    def _current_weights(self):
        """Each trainable tensor's weight ``A + d*Z`` now."""
        raise NotImplementedError

    def _full_gradient(self, source):
        """``(full gradients, their norms)`` over ``source`` (the route's batches), the buffers kept."""
        raise NotImplementedError

    def _take_recenter(self, anchors, offsets, scales, full_grads, mus):
        raise NotImplementedError

    # -- the loop --------------------------------------------------------------------------------------------
    def _recenter_is_due(self):
        if self.recenters == 0:
            return True
        if self.T is None:
            return False
        band = any(mu == arguments.AUTO_MU and uses_band(bits)
                   for mu, bits in zip(self._tensor_mus(), self._tensor_bits()))
        return recenter_due(self.steps_since_recenter, self.T, band,
                            lambda: bit_centering.counter_steps(self.rounding_counter))

    def _run_inner_step(self, run, recenter_source):
        """One inner step; ``run(keys)`` returns the route's :class:`Outcome`. Returns the loss."""
        if self._recenter_is_due():
            self._run_recenter(recenter_source)
        keys = None
        if self._stochastic():
            keys = bit_centering.rounding_keys(self.rounding_counter, len(self._tensor_names()), self._device())
        outcome = run(keys)
        if not bool(outcome.all_finite):
            outcome.undo()
            self.nonfinite_steps += 1
            if self.on_nonfinite == "raise":
                raise NonFiniteError(
                    f"step {self.steps_since_recenter} after recenter {self.recenters}: the loss "
                    f"({float(outcome.loss):g}), a corrected gradient, an update or a new buffer is NaN/Inf; no state "
                    "was changed. Lower lr, check the batch for NaN/Inf, or pass on_nonfinite='skip'.")
            return outcome.loss
        outcome.commit()
        # A new value, not an in-place add: a state_dict() taken earlier keeps the counter it had.
        self.rounding_counter = self.rounding_counter + 1
        self.steps_since_recenter += 1
        return outcome.loss

    def _run_recenter(self, source):
        """``A <- W``; ``G`` = the example-weighted mean gradient over ``source`` at A; ``d`` from G; ``Z <- 0``.
        Nothing changes unless the full gradient succeeds."""
        names, bits = self._tensor_names(), self._tensor_bits()
        if self.recenters:
            self._warn_if_saturated()
        full_grads, norms = self._full_gradient(source)
        mus = self._next_mus(bits)
        if any(b is not None for b in bits) and log.isEnabledFor(logging.DEBUG):  # SVRG has no grid to report on
            log_telemetry(names, [g.numel() for g in full_grads], bits,
                          list(self.stats().values()) if self.recenters else None, mus, norms, self.recenters)
        centered = recentered(self._current_weights(), full_grads, norms, mus, bits)
        self._take_recenter(*zip(*centered), full_grads, mus)
        self.steps_since_recenter = 0
        self.recenters += 1

    def _next_mus(self, bits):
        """Each tensor's mu for this recenter: its setting, or under ``mu="auto"`` the one :func:`next_mus` moves
        it to from the last epoch's telemetry (:func:`first_mu` at the first recenter)."""
        mus = list(self._tensor_mus())
        auto = [i for i, mu in enumerate(mus) if mu == arguments.AUTO_MU]
        if not auto:
            return mus
        state = self._tensor_state()
        started = [i for i in auto if state[i][2] is not None]
        steps = self.steps_since_recenter if self.recenters else 0
        chosen = next_mus([state[i][2] for i in started], [state[i][0] for i in started],
                          [state[i][3] for i in started], steps, [bits[i] for i in started])
        chosen = dict(zip(started, chosen))
        for i in auto:
            mus[i] = chosen.get(i, first_mu(bits[i]))
        return mus

    def _warn_if_saturated(self):
        """Warn when more than ``saturation_warning`` of all offsets sit at their bounds, at the user's line."""
        warn_if_saturated([z for z, *_ in self._tensor_state()], self._tensor_bits(), self.saturation_warning,
                          stacklevel=user_stacklevel())

    # -- what the state says ----------------------------------------------------------------------------------
    def stats(self):
        """Per trainable tensor, by name: ``mu`` (the one its last recenter used), ``scale``, ``saturated`` (the
        fraction of its offset entries at the integer bounds now) and ``underflow`` (the mean
        over the steps since the last recenter of the fraction of entries whose step ``|lr*u/d|`` was below half
        a grid step, 0 before any step; ``None`` for full precision, ``bits=None``). Empty before the first
        recenter."""
        if not self.recenters:
            return {}
        steps = max(self.steps_since_recenter, 1)
        out = {}
        for name, setting, b, (offset, scale, mu, underflow) in zip(
                self._tensor_names(), self._tensor_mus(), self._tensor_bits(), self._tensor_state()):
            out[name] = {"mu": mu if setting == arguments.AUTO_MU else setting, "scale": float(scale),
                         "saturated": float(bit_centering.saturated_fractions([offset], b)[0]),
                         "underflow": None if b is None else float(underflow) / steps}
        return out

    def saturated_fraction(self):
        """The fraction of all offset entries, over every tensor, at the integer bounds now."""
        return saturated_fraction([z for z, *_ in self._tensor_state()], self._tensor_bits())


@contextlib.contextmanager
def same_random_state(device):
    """Yields ``replay()``, which puts the random generators (CPU, and ``device``'s if CUDA) back to their state
    on entry, so the code after it draws the same numbers as the code before it: SVRG's correction cancels noise
    only when ``g(W)`` and ``g(A)`` see the same network (one dropout mask). A compiled step has this by
    construction: its pass at the anchor reuses the random values of the pass at ``W``."""
    cuda = device.type == "cuda"
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if cuda else None

    def replay():
        torch.set_rng_state(cpu_state)
        if cuda:
            torch.cuda.set_rng_state(cuda_state, device)
    yield replay


_PACKAGE_DIRS = tuple(os.path.dirname(os.path.abspath(m)) + os.sep for m in (__file__, torch.__file__))
_GLUE_FILES = (os.path.abspath(contextlib.__file__),)   # a `with` the loop enters on the user's behalf
_PASSES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "passes") + os.sep


def user_stacklevel():
    """The ``stacklevel`` that makes a warning raised by the caller point at the first frame outside halp_fx,
    torch and contextlib: the user's line, however deep the loop calls it from."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_PACKAGE_DIRS + (_PASSES_DIR,)) and filename not in _GLUE_FILES:
            return level
        frame, level = frame.f_back, level + 1
    return level
