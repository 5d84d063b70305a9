"""HALP and SVRG as ``torch.optim`` optimizers, drop-in replacements for torchhalp's.

Per parameter the state is an ``anchor`` A (float32), an ``offset`` Z (integer;
float32 for SVRG), a ``scale`` d (float32 scalar), the ``full_grad`` G at the
anchor and, with momentum, a float32 ``momentum_buffer``. The parameter itself
always holds the weight ``W = A + d*Z`` after :meth:`step`.

A step asks the closure for two gradients on the same batch, at the anchor and
at the weights (from the same random state, so dropout draws one mask for
both), then runs :func:`halp_fx.bit_centering.inner_step` over every tensor in
one ``torch.compile``\\ d function. Its new offsets and momenta are written back
only when everything it would write is finite. Every ``T`` steps, and at the
first, it recenters through :mod:`halp_fx.recenter`, the same code as
``transform``'s step (with ``mu="auto"`` below 8 bits, also three times early in
the first epoch).
"""
import contextlib
import inspect
import itertools
import types
import warnings

import torch

from .. import arguments, bit_centering
from ..data import full_gradient_batches, has_batch_norm, warn_small_batch
from ..loop import HalpLoop, Outcome, same_random_state, user_stacklevel
from ..recenter import examples_in, full_gradient
from .functional import halp_inner_steps


_compiled_copies = itertools.count()


def _compiled_copy(fn):
    """``torch.compile(fullgraph=True)`` of a copy of ``fn`` with a code object of its own.

    torch._dynamo keeps compiled code per code object, with a limit on how many
    versions one may have: optimizers over differently shaped models sharing one
    code object would exhaust it (from the 8th, a hard failure under fullgraph).
    Each optimizer compiles its own copy, for its own shapes, once.
    """
    name = f"{fn.__name__}_{next(_compiled_copies)}"
    code = fn.__code__.replace(co_name=name, **({"co_qualname": name} if hasattr(fn.__code__, "co_qualname") else {}))
    copy = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    return torch.compile(copy, fullgraph=True)


class _BitCenteredOptimizer(HalpLoop, torch.optim.Optimizer):
    """What HALP and SVRG share; they differ only in their per-group hyperparameters. A route of
    :class:`halp_fx.loop.HalpLoop`: it feeds the loop the user's closure."""

    def __init__(self, params, defaults, *, T, data_loader, model, compile, seed, on_nonfinite, saturation_warning):
        self.T = arguments.check_T(T, allow_none=False)
        if data_loader is None:
            raise TypeError("data_loader is required: the full gradient is taken over its batches")
        self.data_loader = arguments.check_data_loader(data_loader)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be the torch.nn.Module the closure runs, or None; got {type(model).__name__}")
        self.model, self.compile, self.seed = model, arguments.check_compile(compile), arguments.check_seed(seed)
        self.on_nonfinite = arguments.check_choice("on_nonfinite", on_nonfinite, arguments.ON_NONFINITE)
        self.saturation_warning = arguments.check_saturation_warning(saturation_warning)
        self.nonfinite_steps = 0
        self._closure_modules = None
        self._warned_unseen_buffers = self._warned_small_batch = False
        super().__init__(params, defaults)
        self._inner_steps = _compiled_copy(halp_inner_steps) if compile else halp_inner_steps

    def add_param_group(self, param_group):
        params = param_group["params"]
        if not isinstance(params, set):
            # A generator would be used up by the checks below; torch.optim itself refuses a set.
            params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = {**param_group, "params": params}
        number = len(self.param_groups)
        values = {**self.defaults, **param_group}
        try:
            arguments.check_positive("lr", values["lr"])
            arguments.check_weight_decay(values["weight_decay"])
            arguments.check_momentum(values["momentum"])
            if values.get("bits") is not None:
                arguments.check_bits(values["bits"])
                arguments.check_mu(values["mu"])
            if not isinstance(values.get("biased", False), bool):
                raise TypeError(f"biased must be True (nearest rounding) or False (stochastic rounding); "
                                f"got {values['biased']!r}")
            arguments.check_parameters(((f"#{i}", p) for i, p in enumerate(params)), owner="parameter group")
        except (TypeError, ValueError) as error:
            raise type(error)(f"parameter group {number}: {error}") from None
        super().add_param_group(param_group)

    def __repr__(self):
        groups = super().__repr__().split("\n", 1)[1]
        buffers = type(self.model).__name__ if self.model is not None else "found through the closure"
        return (f"{type(self).__name__} (\nT: {self.T}, data_loader: {len(self.data_loader)} batches, "
                f"buffers kept from: {buffers}, compile: {self.compile}\n{groups}")

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One HALP inner step; recenters first at the first step and every ``T`` steps.

        ``closure()`` must compute the loss on this step's batch and call
        ``backward()``; ``closure(*batch)`` must do the same on a batch of
        ``data_loader``. Returns the loss of ``closure()`` at the current weights.
        A step whose loss or update is NaN/Inf changes nothing (parameters, offsets, momentum, counters and the
        buffers of ``model``): it raises :class:`halp_fx.NonFiniteError` (``on_nonfinite="raise"``) or is skipped
        and counted in ``nonfinite_steps`` (``"skip"``).
        """
        _check_closure(closure, ())
        return self._run_inner_step(lambda keys: self._step(closure, keys), closure)

    def _step(self, closure, keys):
        params = self._trainable()
        # The pass at W updates the buffers (BatchNorm running statistics) as a training step does; a step that
        # turns out non-finite puts them back, as it leaves everything else.
        buffers = self._buffer_values(closure)
        with same_random_state(params[0].device) as replay:
            anchor_grads = self._gradients_at_anchor(params, closure)
            replay()
            loss, grads = self._gradients(params, closure)
        states = [self.state[p] for p in params]
        groups = [self._group_of[p] for p in params]
        device = params[0].device

        def scalars(key):
            return [torch.as_tensor(g[key], dtype=torch.float32, device=device) for g in groups]
        for state, p, group in zip(states, params, groups):
            if group["momentum"]:
                state.setdefault("momentum_buffer", torch.zeros_like(p, dtype=torch.float32))
            state.setdefault("underflow", torch.zeros((), device=p.device))  # a state saved before it was kept
        new_offsets, new_buffers, new_weights, new_underflows, finite = self._inner_steps(
            torch.as_tensor(0.0 if loss is None else loss, dtype=torch.float32, device=device).detach(),
            [s["anchor"] for s in states], [s["offset"] for s in states], [s["scale"] for s in states],
            grads, anchor_grads, [s["full_grad"] for s in states],
            [s["momentum_buffer"] if g["momentum"] else None for s, g in zip(states, groups)],
            [s["underflow"] for s in states], keys,
            lrs=scalars("lr"), weight_decays=scalars("weight_decay"), momentums=scalars("momentum"),
            bits=[g.get("bits") for g in groups], roundings=[_rounding(g) for g in groups])

        def commit():
            for p, state, offset, buffer, weight, underflow in zip(params, states, new_offsets, new_buffers,
                                                                   new_weights, new_underflows):
                state["offset"], state["underflow"] = offset, underflow
                if buffer is not None:
                    state["momentum_buffer"] = buffer
                p.copy_(weight)

        def undo():
            for buffer, value in buffers:
                buffer.copy_(value)
        return Outcome(loss, finite, commit, undo)

    def _gradients_at_anchor(self, params, closure):
        weights = [p.detach().clone() for p in params]
        for p in params:
            p.copy_(self.state[p]["anchor"])
        try:
            with self._buffers_kept(closure):
                return self._gradients(params, closure)[1]
        finally:
            for p, weight in zip(params, weights):
                p.copy_(weight)

    @staticmethod
    def _gradients(params, closure, *batch):
        # Setting grads to None, not zero, keeps each pass's gradient tensors apart from the next pass's.
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = closure(*batch)
        return loss, [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

    # -- the loop's route ------------------------------------------------------------------------
    @property
    def _group_of(self):
        return {p: group for group in self.param_groups for p in group["params"]}

    def _tensor_names(self):
        """The names ``model.named_parameters()`` gives the trainable tensors when a model was passed, else
        ``param <i>`` (by position among all parameters passed)."""
        named = {id(p): name for name, p in self.model.named_parameters()} if self.model is not None else {}
        every = [p for group in self.param_groups for p in group["params"]]
        return [named.get(id(p), f"param {i}") for i, p in enumerate(every) if p.requires_grad]

    def _tensor_bits(self):
        group_of = self._group_of
        return [group_of[p].get("bits") for p in self._trainable()]

    def _tensor_mus(self):
        group_of = self._group_of
        return [group_of[p].get("mu") for p in self._trainable()]

    def _tensor_state(self):
        # Before the first recenter a tensor has no state: (None, None, None, None).
        return [(s.get("offset"), s.get("scale"), s.get("mu"), s.get("underflow", torch.zeros(())))
                for s in map(self.state.__getitem__, self._trainable())]

    def _device(self):
        return self._trainable()[0].device

    def _stochastic(self):
        return any(g.get("bits") is not None and _rounding(g) == "stochastic" for g in self.param_groups
                   if any(p.requires_grad for p in g["params"]))

    def _current_weights(self):
        return [p.detach().clone() for p in self._trainable()]

    def _full_gradient(self, closure):
        params, first = self._trainable(), []

        def gradient_of(batch):
            _check_closure(closure, batch)
            self._warn_if_small(batch, first, closure)
            return self._gradients(params, closure, *batch)[1]
        with self._buffers_kept(closure):
            return full_gradient(full_gradient_batches(self.data_loader), gradient_of)

    def _take_recenter(self, anchors, offsets, scales, full_grads, mus):
        params = self._trainable()
        for p, anchor, offset, scale, full_grad, mu in zip(params, anchors, offsets, scales, full_grads, mus):
            self.state[p].update(anchor=anchor, offset=offset, scale=scale, full_grad=full_grad,
                                 underflow=torch.zeros((), device=p.device))
            if self._group_of[p].get("mu") == arguments.AUTO_MU:
                self.state[p]["mu"] = mu
        self._counters.setdefault("rounding_counter", torch.tensor(
            bit_centering.first_counter(self.seed), dtype=torch.int64, device=params[0].device))

    def _warn_if_small(self, batch, first, closure):
        examples = examples_in(batch)
        if not first:
            first.append(examples)
        elif examples * 4 < first[0] and not self._warned_small_batch and any(
                has_batch_norm(m) for m in self._modules_with_buffers(closure)):
            self._warned_small_batch = True
            warn_small_batch(examples, first[0], stacklevel=user_stacklevel())

    # The loop's counters live in the first parameter's state, as in torch.optim.LBFGS, so that the inherited
    # state_dict carries them; nonfinite_steps is the optimizer's own.
    rounding_counter = property(lambda self: self._counters["rounding_counter"],
                                lambda self, value: self._counters.__setitem__("rounding_counter", value))
    steps_since_recenter = property(lambda self: self._counters.get("steps_since_recenter", 0),
                                    lambda self, value: self._counters.__setitem__("steps_since_recenter", value))
    recenters = property(lambda self: self._counters.get("recenters", 0),
                         lambda self, value: self._counters.__setitem__("recenters", value))

    # -- state -----------------------------------------------------------------------------------
    @property
    def _counters(self):
        return self.state[self.param_groups[0]["params"][0]]

    def _trainable(self):
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # torch.optim casts every state tensor to its parameter's dtype, which would turn integer
        # offsets and the int64 rounding counter into floats: put back the saved dtypes.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        # A state saved before the count was kept has recentered at least once if it has a step counter.
        if "steps_since_recenter" in self._counters:
            self._counters.setdefault("recenters", 1)

    # -- buffers ---------------------------------------------------------------------------------
    def _buffer_values(self, closure):
        """``(buffer, a copy of its value)`` for every buffer of the modules the step trains, each once."""
        saved = {id(b): (b, b.clone()) for module in self._modules_with_buffers(closure) for b in module.buffers()}
        return list(saved.values())

    @contextlib.contextmanager
    def _buffers_kept(self, closure):
        """Buffers written inside (BatchNorm running statistics) are put back on the way out."""
        saved = self._buffer_values(closure)
        try:
            yield
        finally:
            for buffer, value in saved:
                buffer.copy_(value)

    def _modules_with_buffers(self, closure):
        if self.model is not None:
            return [self.model]
        if self._closure_modules is None:
            found = _modules_named_by(closure, self._trainable())
            if found:
                self._closure_modules = found
                return found
            if not self._warned_unseen_buffers:
                self._warned_unseen_buffers = True
                warnings.warn(f"{type(self).__name__} found no torch.nn.Module holding its parameters among the names "
                              "the closure uses, so the full-gradient pass and the pass at the anchor may also update "
                              "the model's buffers (BatchNorm running statistics); pass model=model to keep them",
                              UserWarning, stacklevel=user_stacklevel())
            return []
        return self._closure_modules


def _modules_named_by(closure, params):
    """The modules that own one of ``params`` among the objects ``closure`` names directly:
    its enclosing-scope variables, its default arguments and the globals it reads."""
    code = getattr(closure, "__code__", None)
    if code is None:
        return []
    candidates = list(closure.__defaults__ or ()) + list((closure.__kwdefaults__ or {}).values())
    for cell in closure.__closure__ or ():
        with contextlib.suppress(ValueError):
            candidates.append(cell.cell_contents)
    candidates += [closure.__globals__[name] for name in code.co_names if name in closure.__globals__]
    wanted = {id(p) for p in params}
    modules = {id(m): m for m in candidates
               if isinstance(m, torch.nn.Module) and any(id(p) in wanted for p in m.parameters())}
    return list(modules.values())


def _rounding(group):
    return "nearest" if group.get("biased") else "stochastic"


def _check_closure(closure, batch):
    if closure is None:
        raise TypeError("step() needs the closure: optimizer.step(closure), where closure() computes the loss on "
                        "this step's batch and calls loss.backward(), and closure(data, target) does the same on "
                        "a batch of data_loader")
    if not callable(closure):
        raise TypeError(f"closure must be callable; got {type(closure).__name__}")
    try:
        signature = inspect.signature(closure)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*batch)
    except TypeError:
        raise TypeError("the closure must accept no arguments, closure(), for the step's own batch, and the tensors of "
                        "a data_loader batch, closure(data, target), for the full gradient: write it as "
                        f"def closure(data=data, target=target): ...; its signature is {signature}") from None


class HALP(_BitCenteredOptimizer):
    """High-Accuracy Low-Precision training (De Sa et al. 2018) as a ``torch.optim`` optimizer.

    Each parameter is held as a float32 anchor, a ``bits``-bit integer offset and
    a float32 scale; the parameter holds ``W = anchor + scale * offset`` after every
    step. The variance-reduced gradient ``g(W) - g(anchor) + full_grad`` moves the
    offset, rounded to the grid and saturated.

    Args:
        params: parameters or parameter groups; each group may set its own
            ``lr``, ``bits``, ``mu``, ``weight_decay``, ``momentum`` and ``biased``.
        lr: learning rate, read from ``param_groups`` at every step (schedulers work).
        T: inner steps between recenters.
        data_loader: batches for the full gradient, a DataLoader or a list of
            ``(data, target)``; the mean is weighted by each batch's ``batch[0].shape[0]``.
        weight_decay: L2 penalty on the full weight W.
        momentum: heavy-ball momentum on the corrected gradient (float32 buffer,
            kept across recenters).
        mu: the grid's scale ``d = ||full_grad|| / (mu * (2**(bits-1) - 1))``, or ``"auto"``: each
            parameter's mu is chosen at every recenter by :func:`halp_fx.auto_mu.next_mus` (kept in its state as
            ``mu``, with the telemetry it reads, ``underflow``). When a group runs it below 8 bits, the optimizer
            recenters three more times early in the first epoch, each ``ceil(T/8)`` steps after the last.
        bits: offset width, 2..32 (int8 up to 8, int16 up to 16, else int32), or
            ``None`` for full precision (then it is :class:`SVRG`).
        biased: ``True`` rounds to nearest, ``False`` (default) rounds stochastically.
        unbiased: torchhalp's wording, the opposite of ``biased``; give one of the two.
        model: the module the closure runs. The full-gradient pass and the pass at
            the anchor put its buffers (BatchNorm running statistics) back, so
            only the pass at the current weights moves them. Without it, the
            optimizer looks for a module holding its parameters among the names the
            closure uses (``model`` in ``output = model(data)``) and warns once if
            there is none.
        compile: run the per-parameter update as one ``torch.compile``\\ d function
            (Inductor); ``False`` runs the same code eagerly.
        seed: start of the stochastic-rounding counter.
        on_nonfinite: a step whose loss or update is NaN/Inf changes no state (parameters, offsets,
            momentum, counters) and ``"raise"``\\ s :class:`halp_fx.NonFiniteError` or is ``"skip"``\\ ped and
            counted in ``nonfinite_steps``. A NaN/Inf full gradient always raises, naming the batch.
        saturation_warning: at each recenter, warn (:class:`halp_fx.SaturationWarning`) when more than
            this fraction of all offsets sat at the integer bounds; :meth:`stats` has each tensor's.

    State per parameter: ``anchor``, ``offset``, ``scale``, ``full_grad`` and
    ``momentum_buffer``; the first parameter's state also holds
    ``steps_since_recenter`` and ``rounding_counter``. ``state_dict()`` carries all
    of it, so a run resumed with ``load_state_dict`` continues bit for bit.
    """

    def __init__(self, params, lr, T, data_loader, *, weight_decay=0.0, momentum=0.0, mu=0.1, bits=8,
                 biased=None, unbiased=None, model=None, compile=True, seed=0, on_nonfinite="raise",
                 saturation_warning=0.1):
        if biased is not None and unbiased is not None and biased == unbiased:
            raise ValueError(f"biased={biased!r} and unbiased={unbiased!r} contradict each other; give one of them")
        if unbiased is not None:
            if not isinstance(unbiased, bool):
                raise TypeError(f"unbiased must be True (stochastic rounding) or False (nearest); got {unbiased!r}")
            biased = not unbiased
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, mu=mu, bits=bits,
                        biased=False if biased is None else biased)
        super().__init__(params, defaults, T=T, data_loader=data_loader, model=model, compile=compile, seed=seed,
                         on_nonfinite=on_nonfinite, saturation_warning=saturation_warning)


class SVRG(_BitCenteredOptimizer):
    """Stochastic variance-reduced gradient: :class:`HALP` in full precision (``bits=None``).

    The offset is float32, the scale is 1 and nothing is rounded. Arguments and
    state are HALP's without ``mu``, ``bits``, ``biased`` and ``seed``.
    """

    def __init__(self, params, lr, T, data_loader, *, weight_decay=0.0, momentum=0.0, model=None, compile=True,
                 on_nonfinite="raise"):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum)
        super().__init__(params, defaults, T=T, data_loader=data_loader, model=model, compile=compile, seed=0,
                         on_nonfinite=on_nonfinite, saturation_warning=1.0)
