"""The object ``halp_fx.transform`` returns: the route of the HALP loop (:mod:`halp_fx.loop`) that runs compiled
graphs over a :class:`~halp_fx.state.HalpState`.

A call runs one inner step through the loop: recenter first when one is due, then the step
program of the batch's shape (:mod:`halp_fx.programs`). The programs are pure
functions of the state: a step returns new tensors, and the state takes them
only when the step's ``all_finite`` flag is True, so a failed or non-finite
step changes nothing.

Momentum survives a recenter: a recenter moves no weight (the new anchor is the
old ``A + d*Z``), so the velocity stays meaningful.
"""
import dataclasses
import weakref

import torch

from . import arguments, centered_int8, distributed, introspection
from .capture import signature_of
from .data import full_gradient_batches, has_batch_norm, warn_small_batch
from .loop import HalpLoop, Outcome, user_stacklevel
from .programs import Programs
from .recenter import examples_in, full_gradient
from .roles import Role
from .state import HalpState

# Parameters whose values a step holds instead of the module (see TrainingStep._release_module_parameters).
# (Keyed by id: tensors compare by value, so no weak set can hold them.)
_RELEASED = {}


def is_released(parameter):
    """Whether a step holds this parameter's values instead of its module."""
    ref = _RELEASED.get(id(parameter))
    return ref is not None and ref() is parameter
# Without a data loader and without T nothing recenters on its own: saturation is then checked this often.
SATURATION_CHECK_EVERY = 256


def _state_counter(name):
    return property(lambda self: getattr(self.state, name), lambda self, value: setattr(self.state, name, value))


class TrainingStep(HalpLoop):
    """Callable HALP training step over a model; see :func:`halp_fx.transform`. A route of
    :class:`halp_fx.loop.HalpLoop`: it feeds the loop compiled graphs (:mod:`halp_fx.programs`)."""

    def __init__(self, model, *, loss_fn, data_loader, bits, lr, T, mu, momentum, weight_decay, rounding, compile,
                 on_nonfinite, seed, saturation_warning, arithmetic="fp32", anchor_precision="fp32",
                 process_group=None):
        self.model, self.loss_fn, self.data_loader = model, loss_fn, data_loader
        self.arithmetic, self.anchor_precision = arithmetic, anchor_precision
        self.bits, self.rounding, self.compile, self.on_nonfinite = bits, rounding, compile, on_nonfinite
        self.momentum, self.weight_decay = momentum, weight_decay
        self._mu = None
        self.lr, self.mu = lr, mu
        self.T = T if T is not None or data_loader is None else len(data_loader)
        self.saturation_warning = saturation_warning
        self.signature = signature_of(model, None)
        self.state = HalpState(model, self.signature, bits, momentum, seed, auto_mu=self.mu == arguments.AUTO_MU)
        # None: one process; else the name of the group the step averages over, which it holds weakly
        self._group_name = None if process_group is None else distributed.group_name(process_group)
        # Whether the low-precision products run even where they do not pay: read here, once per step, from
        # its one spelling (HALP_FX_INT8_PRODUCTS=always), and passed to the pass list explicitly.
        hyper = dict(bits=bits, rounding=rounding, momentum=momentum, weight_decay=weight_decay, arithmetic=arithmetic,
                     anchor_precision=anchor_precision, force_low_precision=centered_int8.forced())
        if process_group is not None:
            hyper.update(group=self._group_name, world_size=torch.distributed.get_world_size(process_group))
        self.programs = Programs(model, loss_fn, hyper, compile, self.state.device.type == "cpu")
        self._layout = None  # (ndim, dtype) per batch tensor, recorded once a step has succeeded
        self._first_examples = None
        self._has_batch_norm = has_batch_norm(model)
        self._warned_small_batch = False
        self._lr_tensor = None
        # The module's own trainable parameters are released once a step has run (the state holds the
        # weights); its forward refuses to run on them until sync_model() writes the weights back.
        self._module_released = self._capturing = False
        model.register_forward_pre_hook(_refuse_released_weights(weakref.ref(self)))

    # -- hyperparameters that may change between steps ---------------------------------------
    @property
    def lr(self):
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = arguments.check_positive("lr", value)
        self._lr_tensor = None

    @property
    def mu(self):
        return self._mu

    @mu.setter
    def mu(self, value):
        value = arguments.check_mu(value)
        if self._mu is not None and (value == arguments.AUTO_MU) != (self._mu == arguments.AUTO_MU):
            raise ValueError(f"mu is {self._mu!r}: a step switches neither to nor from mu='auto' (its state differs); "
                             "pass the mu you want to transform()")
        self._mu = value

    # -- the state, by role ---------------------------------------------------------------------
    anchor = property(lambda self: self.state[Role.ANCHOR])
    offset = property(lambda self: self.state[Role.OFFSET])
    scale = property(lambda self: self.state[Role.SCALE])
    full_grad = property(lambda self: self.state[Role.FULL_GRAD])
    momentum_buffer = property(lambda self: self.state[Role.MOMENTUM])
    buffers = property(lambda self: self.state[Role.BUFFER])
    frozen = property(lambda self: self.state[Role.FROZEN])
    device = property(lambda self: self.state.device)
    # The loop's counters live in the state (its state_dict carries them).
    rounding_counter = _state_counter("rounding_counter")
    steps_since_recenter = _state_counter("steps_since_recenter")
    recenters = _state_counter("recenters")
    nonfinite_steps = _state_counter("nonfinite_steps")

    # -- running -----------------------------------------------------------------------------
    def __call__(self, *batch):
        self.process_group   # a data-parallel step refuses to run once its group is destroyed, naming why
        batch = self._batch(batch)
        loss = self._run_inner_step(lambda keys: self._step(batch, keys),
                                    None if self.data_loader is not None else [batch])
        steps = self.state.steps_since_recenter
        if self.T is None and self.data_loader is None and steps and steps % SATURATION_CHECK_EVERY == 0:
            self._warn_if_saturated()
        return loss

    def _step(self, batch, keys):
        program, sources = self._program_for(batch, keys)
        results = program(sources)

        def commit():
            self.state.commit(program.output_roles, results)
            if self._layout is None:
                self._layout = _layout(batch)
            if not self._module_released:
                self._release_module_parameters()
        return Outcome(results[program.position((Role.LOSS, None))],
                       results[program.position((Role.ALL_FINITE, None))], commit, undo=lambda: None)

    def _program_for(self, batch, keys):
        """The compiled step program for ``batch`` and the inputs it runs on, by role."""
        entry = self._entry(batch)
        sources = self._sources(batch, keys)
        sources[Role.ANCHOR_CONSTANT] = self.programs.anchor_constants(entry, sources, self.state.anchor_version)
        return self.programs.step_program(entry, sources), sources

    def recenter(self, batches=None):
        """Move the anchor to the current weights, take the full gradient there, reset offsets and scales.

        The full gradient is the mean loss gradient over ``batches`` (default: the
        ``data_loader``), each batch weighted by its number of examples. Buffers
        such as BatchNorm running statistics are not updated by it.
        """
        self._run_recenter(batches)

    # -- the loop's route ------------------------------------------------------------------------
    def _tensor_names(self):
        return self.state.names

    def _tensor_bits(self):
        return [self.bits] * len(self.state.names)

    def _tensor_mus(self):
        return [self.mu] * len(self.state.names)

    def _device(self):
        return self.device

    def _tensor_state(self):
        state = self.state
        mus = state.mus if state.auto_mu else {}
        return [(state[Role.OFFSET][n], state[Role.SCALE][n], mus.get(n), state[Role.UNDERFLOW][n])
                for n in state.names]

    def _stochastic(self):
        return self.bits is not None and self.rounding == "stochastic"

    def _current_weights(self):
        return list(self.state.weights().values())

    def _full_gradient(self, batches):
        if batches is None and self.data_loader is None:
            raise ValueError("recenter() needs batches=[...] or a data_loader passed to transform()")
        source = full_gradient_batches(self.data_loader) if batches is None else batches
        weights = self.state.weights()

        def gradient_of(batch):
            batch = self._batch(batch)
            entry = self._entry(batch)
            sources = {**self.state.tensors, Role.PARAM: weights, Role.BATCH: batch}
            program = self.programs.full_gradient_program(entry, sources)
            outputs = program(sources)
            return [outputs[i] for i in program.positions(Role.GRAD)]

        reduce = None
        if self.process_group is not None:
            if batches is None and self.state.recenters == 0:
                distributed.check_same_length(self.data_loader, self.process_group)
            reduce = distributed.sum_over_ranks(self.process_group)
        return full_gradient(source, gradient_of, reduce)

    @property
    def process_group(self):
        """The group the step averages over (``None``: one process)."""
        return None if self._group_name is None else distributed.group_named(self._group_name)

    def _take_recenter(self, anchors, offsets, scales, full_grads, mus):
        self.state.recenter(anchors, offsets, scales, full_grads, mus)

    # -- the state and the module ---------------------------------------------------------------
    def weights(self):
        """``{param name: float32 tensor A + d*Z}``, the weights the model currently has."""
        return self.state.weights()

    def sync_model(self):
        """Write the current weights and buffers into the module (for eval/inference) and return it."""
        params, buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
        with torch.no_grad():
            for n, w in self.weights().items():
                params[n].data = w.to(params[n].dtype)
                _RELEASED.pop(id(params[n]), None)
            for n, b in self.buffers.items():
                buffers[n].copy_(b)
        self._module_released = False
        return self.model

    def _release_module_parameters(self):
        # The module's float32 parameters would otherwise stay allocated beside anchor, offset and full gradient
        # (4 more bytes per parameter). Captures of new batch shapes read the state, not the module.
        with torch.no_grad():
            for n in self.signature.param_names:
                p = self.model.get_parameter(n)
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
                _RELEASED[id(p)] = weakref.ref(p, lambda _, key=id(p): _RELEASED.pop(key, None))
        self._module_released = True

    def state_dict(self):
        """Everything needed to continue exactly: per parameter ``<name>.anchor``, ``.offset``, ``.scale``,
        ``.full_grad`` (and ``.momentum_buffer``), ``buffers.<name>``, the rounding counter, the step counters and lr."""
        return self.state.state_dict(self.lr)

    def load_state_dict(self, state_dict):
        """Restore a :meth:`state_dict`; a dict from another model or another ``bits``, or with a bad counter
        or lr, is an error, and nothing is changed unless every entry fits."""
        self.lr = self.state.load_state_dict(state_dict, self.lr)

    # -- reading the graphs ----------------------------------------------------------------------
    @property
    def graphs(self):
        """Stage name -> GraphModule: the captured gradient graph (which the recenter runs as it is), then one
        stage per pass."""
        return introspection.graphs(self.programs)

    def explain(self):
        """A readable account of the rewrite: each pass, what it changed, and the final graph's code."""
        return introspection.explain(self)

    def dump(self, directory):
        """Write every stage's code, and Inductor's output code when compiled, to ``directory``."""
        return introspection.dump(self, directory)

    # -- internals -----------------------------------------------------------------------------
    def _batch(self, raw):
        """The batch as a tuple of contiguous tensors, checked against the layout of the steps so far."""
        # Contiguous: a program is compiled for the strides of its first batch, and a batch of the same shape
        # with other strides (a transposed copy, a column slice, channels-last) must run on it too.
        batch = tuple(t.contiguous() for t in arguments.as_batch(raw))
        if self._layout is not None and _layout(batch) != self._layout:
            if len(batch) != len(self._layout):
                raise ValueError(f"a batch must have {len(self._layout)} tensors, like the first one; got {len(batch)}")
            raise ValueError(f"the batch's structure changed: expected (ndim, dtype) {self._layout}, got "
                             f"{_layout(batch)}; only the sizes of a batch may change between steps")
        examples = examples_in(batch)
        if self._first_examples is None:
            self._first_examples = examples
        elif (self._has_batch_norm and examples * 4 < self._first_examples and not self._warned_small_batch):
            self._warned_small_batch = True
            warn_small_batch(examples, self._first_examples, stacklevel=user_stacklevel())
        return batch

    def _entry(self, batch):
        signature = dataclasses.replace(self.signature, batch_size=len(batch))
        state = self.state
        example = (list(state[Role.ANCHOR].values()) + list(state[Role.FROZEN].values())
                   + list(state[Role.BUFFER].values()) + list(batch))
        self._capturing = True
        try:
            return self.programs.entry(signature, batch, example)
        finally:
            self._capturing = False

    def _sources(self, batch, keys):
        if self._lr_tensor is None:
            self._lr_tensor = torch.tensor(self.lr, dtype=torch.float32, device=self.device)
        sources = {**self.state.tensors, Role.BATCH: batch, Role.LR: {None: self._lr_tensor}}
        if keys is not None:
            sources[Role.ROUNDING_KEYS] = {None: keys}
        return sources


def _layout(batch):
    return [(t.dim(), t.dtype) for t in batch]


def _refuse_released_weights(step_ref):
    def hook(module, args):
        step = step_ref()
        if step is not None and step._module_released and not step._capturing:
            raise RuntimeError("this model's trainable parameters are held by its halp_fx step (as anchor, offset "
                               "and scale), not by the module: call step.sync_model() to write the current weights "
                               "into it before running it directly")
    return hook
