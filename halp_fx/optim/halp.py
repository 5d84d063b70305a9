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
import logging
import types
import warnings

import torch

from .. import arguments, bit_centering
from ..data import full_gradient_batches, has_batch_norm, warn_small_batch
from ..errors import NonFiniteError
from ..auto_mu import first_mu, log_telemetry, next_mus, uses_band
from ..recenter import examples_in, full_gradient, log, recenter_due, recentered, warn_if_saturated


def inner_steps(groups):
    """:func:`halp_fx.bit_centering.inner_step` for every tensor of every group, as pure functions.

    Returns ``(new offsets, new momentum buffers or None, new weights, new underflow
    sums or None)`` per tensor in order (underflow sums for ``mu="auto"`` groups), and
    one flag: whether the loss, every offset before rounding and every underflow sum are
    finite. ``lr``, ``weight_decay`` and ``momentum`` are 0-d tensors so that a
    scheduler changing them does not recompile; ``bits`` and ``rounding`` are
    constants of the compiled code.
    """
    results, checked = [], [groups[0]["loss"]]
    for group in groups:
        for i in range(len(group["anchors"])):
            momentum_buffer = None if group["momentum_buffers"] is None else group["momentum_buffers"][i]
            key = None if group["keys"] is None else group["keys"][group["indices"][i]]
            new_offset, direction, moved, underflow = bit_centering.inner_step(
                group["anchors"][i], group["offsets"][i], group["scales"][i], group["grads"][i],
                group["anchor_grads"][i], group["full_grads"][i], momentum_buffer, group["lr"],
                weight_decay=group["weight_decay"], momentum=group["momentum"], bits=group["bits"],
                rounding=group["rounding"], key=key)
            new_weight = bit_centering.dequantize(group["anchors"][i], new_offset, group["scales"][i])
            new_underflow = None
            if group["underflows"] is not None:
                new_underflow = group["underflows"][i] + underflow
                checked.append(new_underflow)
            results.append((new_offset, None if momentum_buffer is None else direction, new_weight, new_underflow))
            checked.append(moved)
    return results, bit_centering.all_finite(*checked)


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


class _BitCenteredOptimizer(torch.optim.Optimizer):
    """What HALP and SVRG share; they differ only in their per-group hyperparameters."""

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
        self._inner_steps = _compiled_copy(inner_steps) if compile else inner_steps

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
        A step whose loss or update is NaN/Inf changes nothing: it raises
        :class:`halp_fx.NonFiniteError` (``on_nonfinite="raise"``) or is skipped and
        counted in ``nonfinite_steps`` (``"skip"``).
        """
        _check_closure(closure, ())
        counters = self._counters
        if "steps_since_recenter" not in counters or recenter_due(
                counters["steps_since_recenter"], self.T, self._band,
                lambda: bit_centering.counter_steps(counters["rounding_counter"])):
            self._recenter(closure)
        params = self._trainable()
        # The pass at W updates the buffers (BatchNorm running statistics) as a training step does; a step that
        # turns out non-finite puts them back, as it leaves everything else.
        buffers = self._buffer_values(closure)
        # Both passes draw the same random numbers (dropout's mask): SVRG's correction cancels noise only
        # when g(W) and g(A) see the same network.
        with _same_random_state(params[0].device) as replay:
            anchor_grads = self._gradients_at_anchor(params, closure)
            replay()
            loss, grads = self._gradients(params, closure)
        groups = self._update_arguments(dict(zip(params, grads)), dict(zip(params, anchor_grads)), loss)
        results, finite = self._inner_steps(groups)
        if not bool(finite):
            for buffer, value in buffers:
                buffer.copy_(value)
            self.nonfinite_steps += 1
            if self.on_nonfinite == "raise":
                raise NonFiniteError(f"step {counters['steps_since_recenter']} after the last recenter: the loss "
                                     f"({float(loss):g}) or an update is NaN/Inf; no state was changed. Lower lr, "
                                     "check the batch for NaN/Inf, or pass on_nonfinite='skip'.")
            return loss
        for p, (new_offset, new_momentum, new_weight, new_underflow) in zip(self._updated(groups), results):
            state = self.state[p]
            state["offset"] = new_offset
            if new_momentum is not None:
                state["momentum_buffer"] = new_momentum
            if new_underflow is not None:
                state["underflow"] = new_underflow
            p.copy_(new_weight)
        # A new tensor, not an in-place add: a state_dict() taken earlier keeps the counter it had.
        counters["rounding_counter"] = counters["rounding_counter"] + 1
        counters["steps_since_recenter"] += 1
        return loss

    @property
    def _band(self):
        """Whether a group runs ``mu="auto"`` below 8 bits: then the first epoch has early recenters (for all)."""
        return any(g.get("mu") == arguments.AUTO_MU and uses_band(g.get("bits")) for g in self.param_groups)

    def _recenter(self, closure):
        """``A <- W``; ``G`` = the example-weighted mean gradient over ``data_loader`` at A; ``d`` from G; ``Z <- 0``."""
        params = self._trainable()
        group_of = {p: group for group in self.param_groups for p in group["params"]}
        bits = [group_of[p].get("bits") for p in params]
        if "steps_since_recenter" in self._counters:
            warn_if_saturated([self.state[p]["offset"] for p in params], bits, self.saturation_warning, stacklevel=5)
        with self._buffers_kept(closure):
            full_grads, norms = self._full_gradient(params, closure)
        mus = self._next_mus(params, group_of, bits)
        if any(b is not None for b in bits) and log.isEnabledFor(logging.DEBUG):  # SVRG has no grid to report on
            started = "steps_since_recenter" in self._counters
            log_telemetry(self._parameter_names(params), [p.numel() for p in params], bits,
                          self.stats() if started else None, mus, norms)
        centered = recentered([p.detach().clone() for p in params], full_grads, norms, mus, bits)
        for p, (anchor, offset, scale), full_grad, mu in zip(params, centered, full_grads, mus):
            self.state[p].update(anchor=anchor, offset=offset, scale=scale, full_grad=full_grad)
            if group_of[p].get("mu") == arguments.AUTO_MU:
                self.state[p].update(mu=mu, underflow=torch.zeros((), device=p.device))
        counters = self._counters
        # The seed sits in the high 32 bits, as in the core: the counter alone is the rounding noise's state.
        counters.setdefault("rounding_counter", torch.tensor(bit_centering.first_counter(self.seed), dtype=torch.int64, device=params[0].device))
        counters["steps_since_recenter"] = 0

    def _parameter_names(self, params):
        """The names ``model.named_parameters()`` gives ``params`` when a model was passed, else ``param <i>``."""
        named = {id(p): name for name, p in self.model.named_parameters()} if self.model is not None else {}
        return [named.get(id(p), f"param {i}") for i, p in enumerate(params)]

    def _next_mus(self, params, group_of, bits):
        """Each tensor's mu for this recenter: its group's, or under ``mu="auto"`` the one :func:`next_mus` moves."""
        mus = [group_of[p].get("mu") for p in params]
        auto = [i for i, mu in enumerate(mus) if mu == arguments.AUTO_MU]
        if not auto:
            return mus
        started = [i for i in auto if "mu" in self.state[params[i]]]
        steps = self._counters.get("steps_since_recenter", 0)
        chosen = next_mus([self.state[params[i]]["mu"] for i in started],
                          [self.state[params[i]]["offset"] for i in started],
                          [self.state[params[i]]["underflow"] for i in started], steps, [bits[i] for i in started])
        chosen = dict(zip(started, chosen))
        for i in auto:
            mus[i] = chosen.get(i, first_mu(bits[i]))
        return mus

    def _full_gradient(self, params, closure):
        first = []

        def gradient_of(batch):
            _check_closure(closure, batch)
            self._warn_if_small(batch, first, closure)
            return self._gradients(params, closure, *batch)[1]
        return full_gradient(full_gradient_batches(self.data_loader), gradient_of)

    def _warn_if_small(self, batch, first, closure):
        examples = examples_in(batch)
        if not first:
            first.append(examples)
        elif examples * 4 < first[0] and not self._warned_small_batch and any(
                has_batch_norm(m) for m in self._modules_with_buffers(closure)):
            self._warned_small_batch = True
            warn_small_batch(examples, first[0], stacklevel=9)

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

    def _rounding_keys(self):
        """Every trainable tensor's key for this step, by its position among the trainable tensors (as the
        core numbers them: a frozen tensor passed in ``params`` takes no key)."""
        counter = self._counters["rounding_counter"]
        return bit_centering.rounding_keys(int(counter), len(self._trainable()), counter.device)

    def _update_arguments(self, grads, anchor_grads, loss):
        groups, index, keys = [], 0, None
        for group in self.param_groups:
            indexed = list(enumerate([p for p in group["params"] if p.requires_grad], start=index))
            index += len(indexed)
            if not indexed:
                continue
            params = [p for _, p in indexed]
            bits, rounding = group.get("bits"), "nearest" if group.get("biased") else "stochastic"
            stochastic = bits is not None and rounding == "stochastic"
            if stochastic and keys is None:
                keys = self._rounding_keys()
            states = [self.state[p] for p in params]
            device = params[0].device
            if group["momentum"]:
                for state, p in zip(states, params):
                    state.setdefault("momentum_buffer", torch.zeros_like(p, dtype=torch.float32))
            groups.append(dict(
                params=params,
                loss=torch.as_tensor(0.0 if loss is None else loss, dtype=torch.float32, device=device).detach(),
                anchors=[s["anchor"] for s in states],
                offsets=[s["offset"] for s in states],
                scales=[s["scale"] for s in states],
                grads=[grads[p] for p in params],
                anchor_grads=[anchor_grads[p] for p in params],
                full_grads=[s["full_grad"] for s in states],
                momentum_buffers=[s["momentum_buffer"] for s in states] if group["momentum"] else None,
                underflows=([s["underflow"] for s in states]
                            if bits is not None and group.get("mu") == arguments.AUTO_MU else None),
                keys=keys if stochastic else None,
                indices=tuple(i for i, _ in indexed),
                lr=torch.as_tensor(group["lr"], dtype=torch.float32, device=device),
                weight_decay=torch.as_tensor(group["weight_decay"], dtype=torch.float32, device=device),
                momentum=torch.as_tensor(group["momentum"], dtype=torch.float32, device=device),
                bits=bits,
                rounding=rounding,
            ))
        return groups

    @staticmethod
    def _updated(groups):
        return [p for group in groups for p in group["params"]]

    def stats(self):
        """Per parameter, in the order of ``param_groups``: ``mu`` (the one its last recenter used), ``scale``,
        ``saturated`` (the fraction of its offset entries at the integer bounds now) and, in ``mu="auto"`` groups,
        ``underflow`` (the mean over the steps since the last recenter of the fraction of entries whose step was
        below half a grid step; ``None`` in groups with a numeric mu). Empty before the first step."""
        steps = max(self._counters.get("steps_since_recenter", 0), 1)
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                if "offset" not in state:
                    continue
                bits = group.get("bits")
                saturated = float(bit_centering.saturated_fractions([state["offset"]], bits)[0])
                underflow = float(state["underflow"]) / steps if "underflow" in state else None
                out.append({"mu": state.get("mu", group.get("mu")), "scale": float(state["scale"]),
                            "saturated": saturated, "underflow": underflow})
        return out

    # -- state -----------------------------------------------------------------------------------
    @property
    def _counters(self):
        # Optimizer-wide counters live in the first parameter's state, as in torch.optim.LBFGS,
        # so that the inherited state_dict carries them.
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
                              UserWarning)
            return []
        return self._closure_modules


@contextlib.contextmanager
def _same_random_state(device):
    """Yields ``replay()``, which puts the random generators (CPU, and ``device``'s if CUDA) back to their state
    on entry, so the code after it draws the same numbers as the code before it."""
    cuda = device.type == "cuda"
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if cuda else None

    def replay():
        torch.set_rng_state(cpu_state)
        if cuda:
            torch.cuda.set_rng_state(cuda_state, device)
    yield replay


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
