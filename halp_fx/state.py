"""The state a HALP step advances, keyed by role and name, and its checkpoint form.

``tensors[role][name]``: per trainable tensor ``ANCHOR`` (float32), ``OFFSET``
(integer, or float32 for ``bits=None``), ``SCALE`` (float32 scalar),
``FULL_GRAD`` (float32), ``UNDERFLOW`` (the telemetry of ``mu="auto"``, a 0-d
float32 sum over the steps since the last recenter) and, with momentum,
``MOMENTUM`` (float32); with ``mu="auto"``, ``mus[name]``; per model
``FROZEN`` parameters and ``BUFFER``\\ s. The counters: ``rounding_counter``
(the seed in its high 32 bits, steps taken in its low 32 bits: the whole random
state of stochastic rounding), ``steps_since_recenter``, ``recenters`` and
``nonfinite_steps``.
"""
from collections import OrderedDict

import torch

from . import arguments, bit_centering
from .auto_mu import AUTO_MU_BOUNDS, first_mu
from .roles import COMMITTED, PER_TENSOR_STATE, Role

# State dict names that differ from the role's: the momentum is ``momentum_buffer``, as in torch.optim.
STATE_DICT_NAMES = {Role.MOMENTUM: "momentum_buffer"}
_COUNTERS = ("rounding_counter", "steps_since_recenter", "recenters", "nonfinite_steps")


class HalpState:
    def __init__(self, model, signature, bits, momentum, seed, auto_mu=False):
        self.bits, self.momentum, self.auto_mu = bits, momentum, auto_mu
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        anchor = OrderedDict((n, params[n].detach().to(torch.float32, copy=True)) for n in signature.param_names)
        self.tensors = {
            Role.ANCHOR: anchor,
            Role.OFFSET: OrderedDict((n, torch.zeros_like(a, dtype=bit_centering.offset_dtype(bits)))
                                     for n, a in anchor.items()),
            Role.SCALE: OrderedDict((n, torch.zeros((), device=a.device) if bits is not None
                                     else torch.ones((), device=a.device)) for n, a in anchor.items()),
            Role.FULL_GRAD: OrderedDict((n, torch.zeros_like(a)) for n, a in anchor.items()),
            Role.MOMENTUM: OrderedDict((n, torch.zeros_like(a)) for n, a in anchor.items()) if momentum else OrderedDict(),
            Role.UNDERFLOW: OrderedDict((n, torch.zeros((), device=a.device)) for n, a in anchor.items()),
            Role.FROZEN: OrderedDict((n, params[n].detach()) for n in signature.frozen_names),
            Role.BUFFER: OrderedDict((n, buffers[n].detach().clone()) for n in signature.buffer_names),
        }
        # mu="auto": each tensor's mu, a Python float (a power of two), chosen at every recenter.
        self.mus = OrderedDict((n, first_mu(bits)) for n in anchor) if auto_mu else OrderedDict()
        self.rounding_counter = bit_centering.first_counter(seed)
        self.steps_since_recenter = self.recenters = self.nonfinite_steps = 0
        self.anchor_version = 0  # moves whenever the anchors (and so what is computed from them alone) may change

    def __getitem__(self, role):
        return self.tensors[role]

    @property
    def names(self):
        return list(self.tensors[Role.ANCHOR])

    @property
    def device(self):
        return next(iter(self.tensors[Role.ANCHOR].values())).device

    def weight(self, name):
        return bit_centering.dequantize(self[Role.ANCHOR][name], self[Role.OFFSET][name], self[Role.SCALE][name])

    def weights(self):
        """``{param name: float32 tensor A + d*Z}``."""
        return OrderedDict((n, self.weight(n)) for n in self.names)

    def commit(self, roles, values):
        """Replace the state of each ``(role, name)`` in ``roles`` that a step updates by its new value."""
        for (role, name), value in zip(roles, values):
            if role in COMMITTED:
                self.tensors[role][name] = value

    def recenter(self, anchors, offsets, scales, full_grads, mus=None):
        names = self.names
        if self.auto_mu:
            self.mus = OrderedDict(zip(names, mus))
        self.tensors[Role.UNDERFLOW] = OrderedDict((n, torch.zeros_like(u)) for n, u in self.tensors[Role.UNDERFLOW].items())
        self.tensors[Role.ANCHOR] = OrderedDict(zip(names, anchors))
        self.tensors[Role.OFFSET] = OrderedDict(zip(names, offsets))
        self.tensors[Role.SCALE] = OrderedDict(zip(names, scales))
        self.tensors[Role.FULL_GRAD] = OrderedDict(zip(names, full_grads))
        self.anchor_version += 1

    # -- checkpoints -----------------------------------------------------------------------------
    def _keys(self):
        """``{state dict key: (role, name)}`` for every tensor of the state."""
        keys = OrderedDict((f"{n}.{STATE_DICT_NAMES.get(role, role.value)}", (role, n))
                           for n in self.names for role in PER_TENSOR_STATE if n in self.tensors[role])
        if self.auto_mu:
            # The telemetry the next recenter reads; with a numeric mu it is not needed to continue exactly.
            keys.update((f"{n}.{Role.UNDERFLOW.value}", (Role.UNDERFLOW, n)) for n in self.names)
        keys.update((f"buffers.{n}", (Role.BUFFER, n)) for n in self.tensors[Role.BUFFER])
        return keys

    def state_dict(self, lr):
        """Per parameter ``<name>.anchor``, ``.offset``, ``.scale``, ``.full_grad`` (and ``.momentum_buffer``),
        ``buffers.<name>``, the counters, ``lr`` and ``bits``; every tensor a copy."""
        state = OrderedDict((key, self.tensors[role][name]) for key, (role, name) in self._keys().items())
        state.update((f"{n}.mu", mu) for n, mu in self.mus.items())
        state.update({c: getattr(self, c) for c in _COUNTERS}, lr=lr, bits=self.bits)
        return OrderedDict((k, v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items())

    def load_state_dict(self, state_dict, lr):
        """Restore a :meth:`state_dict` and return its ``lr``. Everything is checked before anything changes:
        a dict from another model or another ``bits``, or with a bad counter or lr, is an error."""
        expected = self.state_dict(lr)
        # Saved before the momentum state took torch.optim's name: ``<name>.momentum`` loads as ``.momentum_buffer``.
        state_dict = {(k[:-len(".momentum")] + ".momentum_buffer" if k.endswith(".momentum")
                       and k[:-len(".momentum")] in self.tensors[Role.ANCHOR] else k): v for k, v in state_dict.items()}
        if state_dict.get("bits", "missing") != self.bits:
            raise ValueError(f"the state dict was saved with bits={state_dict.get('bits', 'missing')!r}; "
                             f"this step has bits={self.bits!r}")
        saved_auto = any(key.endswith(".mu") and key[:-3] in self.tensors[Role.ANCHOR] for key in state_dict)
        if saved_auto != self.auto_mu:
            raise ValueError(f"the state dict was saved with {'' if saved_auto else 'a numeric '}mu"
                             f"{'=' + repr(arguments.AUTO_MU) if saved_auto else ''}; this step has "
                             f"{'mu=' + repr(arguments.AUTO_MU) if self.auto_mu else 'a numeric mu'}")
        missing, unexpected = set(expected) - set(state_dict), set(state_dict) - set(expected)
        if missing or unexpected:
            raise KeyError(f"the state dict does not fit this model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        for key, mine in expected.items():
            theirs = state_dict[key]
            if isinstance(mine, torch.Tensor) and (
                    not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape or theirs.dtype != mine.dtype):
                got = f"{tuple(theirs.shape)} {theirs.dtype}" if isinstance(theirs, torch.Tensor) else type(theirs).__name__
                raise ValueError(f"state dict entry {key!r} is {got}; this step needs {tuple(mine.shape)} {mine.dtype}")
        counters = {c: arguments.check_count(c, state_dict[c]) for c in _COUNTERS}
        if counters["rounding_counter"] >= 2 ** 63:
            raise ValueError(f"state dict entry 'rounding_counter' must be below 2**63; got {counters['rounding_counter']}")
        new_lr = arguments.check_positive("lr", state_dict["lr"])
        mus = OrderedDict((n, _checked_mu(f"{n}.mu", state_dict[f"{n}.mu"])) for n in self.mus)
        for key, (role, name) in self._keys().items():
            self.tensors[role][name] = state_dict[key].detach().clone().to(self.device)
        self.mus = mus
        for c, value in counters.items():
            setattr(self, c, value)
        self.anchor_version += 1
        return new_lr


def _checked_mu(key, value):
    low, high = AUTO_MU_BOUNDS
    if not isinstance(value, float) or not low <= value <= high:
        raise ValueError(f"state dict entry {key!r} must be a float from {low:g} to {high:g} (a mu chosen by "
                         f"mu='auto'); got {value!r}")
    return value
