"""HALP and SVRG as ``torch.optim`` optimizers, drop-in replacements for torchhalp's.

Per parameter the state is an ``anchor`` A (float32), an ``offset`` Z (integer;
float32 for SVRG), a ``scale`` d (float32 scalar), the ``full_grad`` G at the
anchor and, with momentum, a float32 ``momentum_buffer``. The parameter itself
always holds the weight ``W = A + d*Z`` after :meth:`step`.

A step asks the closure for two gradients on the same batch, at the anchor and
at the weights, then runs :func:`bit_centered_update` (one ``torch.compile``\\ d
call for all groups) over them. Every ``T`` steps, and at the first, it
recenters: ``A <- W``, G is the mean gradient over ``data_loader`` and ``Z <- 0``.
"""
import contextlib
import inspect
import warnings

import torch

from .. import arguments, bit_centering


def bit_centered_update(params, anchors, offsets, scales, grads, anchor_grads, full_grads, momentum_buffers,
                        keys, indices, lr, weight_decay, momentum, bits, rounding):
    """One inner step for one parameter group, written in place into offsets, momentum buffers and params.

    ``lr``, ``weight_decay`` and ``momentum`` are 0-d tensors so that a scheduler
    changing them does not recompile; ``bits`` and ``rounding`` are constants of
    the compiled code. ``keys[indices[i]]`` is ``params[i]``'s rounding key for this
    step; ``keys`` is ``None`` when the group is not rounded stochastically.
    """
    for i, param in enumerate(params):
        weight = bit_centering.dequantize(anchors[i], offsets[i], scales[i])
        direction = bit_centering.svrg_corrected(grads[i], anchor_grads[i], full_grads[i])
        direction = bit_centering.with_weight_decay(direction, weight, weight_decay)
        if momentum_buffers is not None:
            direction = bit_centering.momentum_step(momentum_buffers[i], direction, momentum)
            momentum_buffers[i].copy_(direction)
        offsets[i].copy_(bit_centering.offset_step(offsets[i], scales[i], direction, lr, bits, rounding,
                                                   None if keys is None else keys[indices[i]]))
        param.copy_(bit_centering.dequantize(anchors[i], offsets[i], scales[i]))


def _update_all_groups(groups):
    for group in groups:
        bit_centered_update(**group)


class _BitCenteredOptimizer(torch.optim.Optimizer):
    """What HALP and SVRG share; they differ only in their per-group hyperparameters."""

    def __init__(self, params, defaults, *, T, data_loader, model, compile, seed):
        self.T = arguments.check_T(T, allow_none=False)
        if data_loader is None:
            raise TypeError("data_loader is required: the full gradient is taken over its batches")
        self.data_loader = arguments.check_data_loader(data_loader)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be the torch.nn.Module the closure runs, or None; got {type(model).__name__}")
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False; got {compile!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 31:
            raise ValueError(f"seed must be an int in [0, 2**31); got {seed!r}")
        self.model, self.compile, self.seed = model, compile, seed
        self._closure_modules = None
        self._warned_unseen_buffers = False
        super().__init__(params, defaults)
        self._update = torch.compile(_update_all_groups, fullgraph=True) if compile else _update_all_groups

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
                arguments.check_positive("mu", values["mu"])
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
        """
        _check_closure(closure, ())
        counters = self._counters
        if "steps_since_recenter" not in counters or counters["steps_since_recenter"] >= self.T:
            self._recenter(closure)
        params = self._trainable()
        anchor_grads = self._gradients_at_anchor(params, closure)
        loss, grads = self._gradients(params, closure)
        self._update(self._update_arguments(dict(zip(params, grads)), dict(zip(params, anchor_grads))))
        counters["rounding_counter"].add_(1)
        counters["steps_since_recenter"] += 1
        return loss

    def _recenter(self, closure):
        """``A <- W``; ``G`` = the example-weighted mean gradient over ``data_loader`` at A; ``d`` from G; ``Z <- 0``."""
        params = self._trainable()
        with self._buffers_kept(closure):
            full_grads = self._full_gradient(params, closure)
        group_of = {p: group for group in self.param_groups for p in group["params"]}
        for p, full_grad in zip(params, full_grads):
            group, state = group_of[p], self.state[p]
            state["anchor"] = p.detach().to(torch.float32, copy=True)
            state["offset"] = torch.zeros_like(p, dtype=bit_centering.offset_dtype(group.get("bits")))
            state["scale"] = bit_centering.scale_for(full_grad, group.get("mu"), group.get("bits"))
            state["full_grad"] = full_grad
        counters = self._counters
        # The seed sits in the high 32 bits, as in the core: the counter alone is the rounding noise's state.
        counters.setdefault("rounding_counter", torch.tensor(self.seed << 32, dtype=torch.int64, device=params[0].device))
        counters["steps_since_recenter"] = 0

    def _full_gradient(self, params, closure):
        full_grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        examples_seen = 0
        for raw in self.data_loader:
            batch = arguments.as_batch(raw)
            _check_closure(closure, batch)
            _, grads = self._gradients(params, closure, *batch)
            # The closure returns a per-batch mean; weighting by batch size makes a short last batch count less.
            examples = batch[0].shape[0] if batch[0].dim() else 1
            for full_grad, grad in zip(full_grads, grads):
                full_grad.add_(grad, alpha=examples)
            examples_seen += examples
        for full_grad in full_grads:
            full_grad.div_(examples_seen)
        return full_grads

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
        """Every parameter's key for this step, keyed by its position among all the optimizer's parameters."""
        counter = self._counters["rounding_counter"]
        count = sum(len(group["params"]) for group in self.param_groups)
        return bit_centering.rounding_keys(int(counter), count, counter.device)

    def _update_arguments(self, grads, anchor_grads):
        groups, index, keys = [], 0, None
        for group in self.param_groups:
            indexed = [(i, p) for i, p in enumerate(group["params"], start=index) if p.requires_grad]
            index += len(group["params"])
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
                anchors=[s["anchor"] for s in states],
                offsets=[s["offset"] for s in states],
                scales=[s["scale"] for s in states],
                grads=[grads[p] for p in params],
                anchor_grads=[anchor_grads[p] for p in params],
                full_grads=[s["full_grad"] for s in states],
                momentum_buffers=[s["momentum_buffer"] for s in states] if group["momentum"] else None,
                keys=keys if stochastic else None,
                indices=tuple(i for i, _ in indexed),
                lr=torch.as_tensor(group["lr"], dtype=torch.float32, device=device),
                weight_decay=torch.as_tensor(group["weight_decay"], dtype=torch.float32, device=device),
                momentum=torch.as_tensor(group["momentum"], dtype=torch.float32, device=device),
                bits=bits,
                rounding=rounding,
            ))
        return groups

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
    @contextlib.contextmanager
    def _buffers_kept(self, closure):
        """Buffers written inside (BatchNorm running statistics) are put back on the way out."""
        saved = {id(b): (b, b.clone()) for module in self._modules_with_buffers(closure) for b in module.buffers()}
        try:
            yield
        finally:
            for buffer, value in saved.values():
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
        mu: the grid's scale ``d = ||full_grad|| / (mu * (2**(bits-1) - 1))``.
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

    State per parameter: ``anchor``, ``offset``, ``scale``, ``full_grad`` and
    ``momentum_buffer``; the first parameter's state also holds
    ``steps_since_recenter`` and ``rounding_counter``. ``state_dict()`` carries all
    of it, so a run resumed with ``load_state_dict`` continues bit for bit.
    """

    def __init__(self, params, lr, T, data_loader, *, weight_decay=0.0, momentum=0.0, mu=0.1, bits=8,
                 biased=None, unbiased=None, model=None, compile=True, seed=0):
        if biased is not None and unbiased is not None and biased == unbiased:
            raise ValueError(f"biased={biased!r} and unbiased={unbiased!r} contradict each other; give one of them")
        if unbiased is not None:
            if not isinstance(unbiased, bool):
                raise TypeError(f"unbiased must be True (stochastic rounding) or False (nearest); got {unbiased!r}")
            biased = not unbiased
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, mu=mu, bits=bits,
                        biased=False if biased is None else biased)
        super().__init__(params, defaults, T=T, data_loader=data_loader, model=model, compile=compile, seed=seed)


class SVRG(_BitCenteredOptimizer):
    """Stochastic variance-reduced gradient: :class:`HALP` in full precision (``bits=None``).

    The offset is float32, the scale is 1 and nothing is rounded. Arguments and
    state are HALP's without ``mu``, ``bits``, ``biased`` and ``seed``.
    """

    def __init__(self, params, lr, T, data_loader, *, weight_decay=0.0, momentum=0.0, model=None, compile=True):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum)
        super().__init__(params, defaults, T=T, data_loader=data_loader, model=model, compile=compile, seed=0)
