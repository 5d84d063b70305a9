"""The object ``halp_fx.transform`` returns: HALP state plus the compiled step that advances it.

State per trainable tensor: ``anchor`` (float32), ``offset`` (integer, or float32
for ``bits=None``), ``scale`` (float32 scalar), ``full_grad`` (float32) and, with
momentum, ``momentum`` (float32). The graphs are pure functions of that state:
a step returns new tensors, and the state is replaced only when the step's
``all_finite`` flag is True, so a failed or non-finite step changes nothing.

Momentum survives a recenter: a recenter moves no weight (the new anchor is the
old ``A + d*Z``), so the velocity stays meaningful.
"""
import dataclasses
import os
import warnings
from collections import OrderedDict

import torch

from . import bit_centering, passes
from .arguments import as_batch
from .capture import OUTPUT_ROLES, ROLE, capture_gradient, capture_training_step, signature_of
from .inductor import compile_graph


class NonFiniteError(FloatingPointError):
    """A step's loss or corrected gradient, or a full gradient, was NaN or infinite; no state changed."""


class SaturationWarning(UserWarning):
    """Many offsets sat at the integer bounds during an epoch: mu or lr is too large."""


class _Program:
    """One graph, compiled or not, and how its inputs and outputs map to state roles."""

    def __init__(self, gm, example_inputs, compile, stages=None, summaries=None):
        self.stages, self.summaries = stages, summaries
        self.input_roles = [n.meta[ROLE] for n in gm.graph.nodes if n.op == "placeholder"]
        self.output_roles = next(n for n in gm.graph.nodes if n.op == "output").meta[OUTPUT_ROLES]
        self.gm = gm
        self.output_code = None
        self._positions = {}
        if compile:
            self.fn, self.output_code = compile_graph(gm, example_inputs)
        else:
            self.fn = gm

    def __call__(self, inputs):
        return dict(zip(self.output_roles, self.fn(*inputs)))

    def positions(self, roles):
        """The output positions of ``roles`` (a tuple), looked up once per tuple."""
        if roles not in self._positions:
            index = {role: i for i, role in enumerate(self.output_roles)}
            self._positions[roles] = [index[role] for role in roles]
        return self._positions[roles]


class TrainingStep:
    """Callable HALP training step over a model; see :func:`halp_fx.transform`."""

    def __init__(self, model, loss_fn, data_loader, *, bits, lr, T, mu, momentum, weight_decay,
                 rounding, compile, on_nonfinite, seed, batch_size,
                 saturation_warning=0.1):
        self.model, self.loss_fn, self.data_loader = model, loss_fn, data_loader
        self.bits, self.lr, self.mu = bits, lr, mu
        self.momentum, self.weight_decay, self.rounding = momentum, weight_decay, rounding
        self.T = T if T is not None or data_loader is None else len(data_loader)
        self.compile, self.on_nonfinite = compile, on_nonfinite
        self.signature = signature_of(model, batch_size)
        params = dict(model.named_parameters())
        self.anchor = OrderedDict((n, params[n].detach().to(torch.float32).clone()) for n in self.signature.param_names)
        dtype = bit_centering.offset_dtype(bits)
        self.offset = OrderedDict((n, torch.zeros_like(a, dtype=dtype)) for n, a in self.anchor.items())
        self.scale = OrderedDict((n, torch.zeros((), device=a.device) if bits is not None else torch.ones((), device=a.device))
                                 for n, a in self.anchor.items())
        self.full_grad = OrderedDict((n, torch.zeros_like(a)) for n, a in self.anchor.items())
        self.momentum_buffer = OrderedDict((n, torch.zeros_like(a)) for n, a in self.anchor.items()) if momentum else OrderedDict()
        self.frozen = OrderedDict((n, params[n].detach()) for n in self.signature.frozen_names)
        buffers = dict(model.named_buffers())
        self.buffers = OrderedDict((n, buffers[n].detach().clone()) for n in self.signature.buffer_names)
        self.rounding_counter = int(seed) << 32  # seed in the high bits, steps taken in the low bits
        self.steps_since_recenter = 0
        self.recenters = 0
        self.nonfinite_steps = 0
        self.saturation_warning = saturation_warning
        self._step_programs, self._gradient_programs = {}, {}
        # Inductor's C++ kernels load int8 through a slow partial-vector path on AVX2 (about 1.7 ns
        # per element, more than the rest of the update): on CPU the compiled step reads the offsets
        # of large tensors widened to float32 by one ATen conversion each (about 7 us per call, so
        # small tensors stay int8), made just before the call and freed after. The stored offsets
        # stay integers; the arithmetic is the same to the bit.
        widen = compile and bits is not None and self.device.type == "cpu"
        self._widened_offsets = {n for n, a in self.anchor.items() if widen and a.numel() >= 4096}
        self._first_step = None
        self._lr_cache = (None, None)

    # -- running -----------------------------------------------------------------------------
    @property
    def device(self):
        return next(iter(self.anchor.values())).device

    def __call__(self, *batch):
        batch = as_batch(batch)
        self._check_batch(batch)
        if self.steps_since_recenter == 0 and self.recenters == 0 or (
                self.T is not None and self.steps_since_recenter >= self.T):
            self._recenter(None if self.data_loader is not None else [batch])
        program = self._step_program(batch)
        results = program(self._inputs(program, batch))
        if not bool(results[("all_finite", None)]):
            self.nonfinite_steps += 1
            if self.on_nonfinite == "raise":
                raise NonFiniteError(
                    f"step {self.steps_since_recenter} after recenter {self.recenters}: the loss "
                    f"({float(results[('loss', None)]):g}) or a corrected gradient is NaN/Inf; no state was "
                    "changed. Lower lr, check the batch for NaN/Inf, or pass on_nonfinite='skip'.")
            return results[("loss", None)]
        self._commit(results)
        self.rounding_counter += 1
        self.steps_since_recenter += 1
        return results[("loss", None)]

    def recenter(self, batches=None):
        """Move the anchor to the current weights, take the full gradient there, reset offsets and scales.

        The full gradient is the mean loss gradient over ``batches`` (default: the
        ``data_loader``), each batch weighted by its number of examples. Buffers
        such as BatchNorm running statistics are not updated by it.
        """
        self._recenter(batches)

    def _recenter(self, batches):
        # Called by recenter() and __call__ alike, so that warnings point at the user's line.
        source = self.data_loader if batches is None else batches
        if source is None:
            raise ValueError("recenter() needs batches=[...] or a data_loader passed to transform()")
        anchor = OrderedDict((n, self._weight(n)) for n in self.anchor)
        total = 0
        full_grad = OrderedDict((n, torch.zeros_like(a)) for n, a in anchor.items())
        accumulators, gradient_roles = list(full_grad.values()), tuple(("full_grad", n) for n in full_grad)
        for raw in source:
            batch = as_batch(raw)
            self._check_batch(batch)
            program = self._gradient_program(batch)
            outputs = program.fn(*self._inputs(program, batch, anchor=anchor))
            examples = batch[0].shape[0] if batch[0].dim() else 1
            torch._foreach_add_(accumulators, [outputs[i] for i in program.positions(gradient_roles)], alpha=examples)
            total += examples
        if total == 0:
            raise ValueError("the full gradient saw no batch: data_loader (or batches=) is empty")
        self._warn_if_saturated()
        torch._foreach_div_(accumulators, total)
        # A norm is NaN or infinite when an element is: one check, one host sync, for all tensors.
        norms = torch._foreach_norm(accumulators)
        if not bool(torch.isfinite(torch.stack(norms)).all()):
            self.nonfinite_steps += 1
            if self.on_nonfinite == "raise":
                raise NonFiniteError("the full gradient is NaN/Inf; the anchor, offsets and scales were not "
                                     "changed. Check the data for NaN/Inf or lower lr.")
            return
        self.anchor, self.full_grad = anchor, full_grad
        self.scale = OrderedDict((n, bit_centering.scale_from_norm(norm, self.mu, self.bits))
                                 for n, norm in zip(full_grad, norms))
        self.offset = OrderedDict((n, torch.zeros_like(z)) for n, z in self.offset.items())
        self.steps_since_recenter = 0
        self.recenters += 1

    # -- state ---------------------------------------------------------------------------------
    def _weight(self, name):
        return bit_centering.dequantize(self.anchor[name], self.offset[name], self.scale[name])

    def weights(self):
        """``{param name: float32 tensor A + d*Z}``, the weights the model currently has."""
        return OrderedDict((n, self._weight(n)) for n in self.anchor)

    def sync_model(self):
        """Write the current weights and buffers into the module (for eval/inference) and return it."""
        params, buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
        with torch.no_grad():
            for n, w in self.weights().items():
                params[n].copy_(w)
            for n, b in self.buffers.items():
                buffers[n].copy_(b)
        return self.model

    def stats(self):
        """Per tensor: ``scale`` and ``saturated``, the fraction of offset entries at the integer bounds now."""
        scales = torch.stack(list(self.scale.values())).tolist()
        saturated = bit_centering.saturated_fractions(list(self.offset.values()), self.bits).tolist()
        return OrderedDict((n, {"scale": scale, "saturated": fraction})
                           for n, scale, fraction in zip(self.anchor, scales, saturated))

    def state_dict(self):
        """Everything needed to continue exactly: per parameter ``<name>.anchor``, ``.offset``, ``.scale``,
        ``.full_grad`` (and ``.momentum``), ``buffers.<name>``, the rounding counter, the step counters and lr."""
        state = OrderedDict()
        for n in self.anchor:
            state[f"{n}.anchor"], state[f"{n}.offset"] = self.anchor[n], self.offset[n]
            state[f"{n}.scale"], state[f"{n}.full_grad"] = self.scale[n], self.full_grad[n]
            if self.momentum:
                state[f"{n}.momentum"] = self.momentum_buffer[n]
        for n, b in self.buffers.items():
            state[f"buffers.{n}"] = b
        state.update(rounding_counter=self.rounding_counter, steps_since_recenter=self.steps_since_recenter,
                     recenters=self.recenters,
                     nonfinite_steps=self.nonfinite_steps, lr=self.lr, bits=self.bits)
        return OrderedDict((k, v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items())

    def load_state_dict(self, state_dict):
        """Restore a :meth:`state_dict`; a dict from another model or another ``bits`` is an error, and
        nothing is changed unless every entry fits."""
        expected = self.state_dict()
        if state_dict.get("bits", "missing") != self.bits:
            raise ValueError(f"the state dict was saved with bits={state_dict.get('bits', 'missing')!r}; "
                             f"this step has bits={self.bits!r}")
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

        def tensor(key):
            return state_dict[key].detach().clone().to(self.device)
        for n in self.anchor:
            self.anchor[n], self.offset[n] = tensor(f"{n}.anchor"), tensor(f"{n}.offset")
            self.scale[n], self.full_grad[n] = tensor(f"{n}.scale"), tensor(f"{n}.full_grad")
            if self.momentum:
                self.momentum_buffer[n] = tensor(f"{n}.momentum")
        for n in self.buffers:
            self.buffers[n] = tensor(f"buffers.{n}")
        self.rounding_counter = state_dict["rounding_counter"]
        self.steps_since_recenter, self.recenters = state_dict["steps_since_recenter"], state_dict["recenters"]
        self.nonfinite_steps, self.lr = state_dict["nonfinite_steps"], state_dict["lr"]

    # -- graphs --------------------------------------------------------------------------------
    @property
    def graphs(self):
        """Stage name -> GraphModule: the captured plain step, one stage per pass, then the full gradient."""
        if self._first_step is None:
            raise RuntimeError("no graph yet: the step is captured on its first call, step(*batch)")
        step, gradient = self._first_step
        return OrderedDict(**step.stages, full_gradient=gradient.gm)

    def explain(self):
        """A readable account of the rewrite: each pass, what it changed, and the final graph's code."""
        graphs = self.graphs
        step = self._first_step[0]
        counts = {name: sum(1 for n in gm.graph.nodes if n.op == "call_function") for name, gm in graphs.items()}
        mode = "full-precision SVRG (bits=None)" if self.bits is None else f"{self.bits}-bit HALP"
        lines = [f"halp_fx training step: {mode}, lr={self.lr}, T={self.T}, mu={self.mu}, "
                 f"rounding={self.rounding!r}, compile={self.compile}",
                 f"  captured: the plain SGD step, {counts['captured']} aten ops"]
        for i, (name, summary) in enumerate(step.summaries.items(), 1):
            lines.append(f"  {i}. {name}: {summary} ({counts[name]} ops)")
        lines.append(f"  full_gradient: the recenter's gradient graph, {counts['full_gradient']} ops, writes no buffer")
        final = list(step.stages)[-1]
        lines += ["", f"final step graph ({final}):", _readable(graphs[final].code)]
        return "\n".join(lines)

    def dump(self, directory):
        """Write every stage's code, and Inductor's output code when compiled, to ``directory``."""
        os.makedirs(directory, exist_ok=True)
        written = []
        for i, (name, gm) in enumerate(self.graphs.items()):
            written.append(os.path.join(directory, f"{i:02d}_{name}.py"))
            with open(written[-1], "w") as f:
                f.write(_readable(gm.code) + "\n")
        for label, program in zip(("step", "full_gradient"), self._first_step):
            if program.output_code:
                written.append(os.path.join(directory, f"inductor_{label}.py"))
                with open(written[-1], "w") as f:
                    f.write(program.output_code)
        return written

    # -- internals -----------------------------------------------------------------------------
    def _warn_if_saturated(self):
        if self.bits is None or self.recenters == 0:
            return
        if any(s["saturated"] > self.saturation_warning for s in self.stats().values()):
            # The text does not change from epoch to epoch, so Python's default filter shows it once per call site
            # instead of at every recenter; stats() has the figures.
            warnings.warn(f"some tensors ended an epoch with more than {self.saturation_warning:.0%} of their offsets "
                          f"at the {self.bits}-bit bounds: the grid is too fine for the steps taken; lower mu or lr "
                          "(step.stats() gives each tensor's fraction)", SaturationWarning, stacklevel=4)

    def _check_batch(self, batch):
        if self.signature.batch_size is None:
            self.signature = dataclasses.replace(self.signature, batch_size=len(batch))
        if len(batch) != self.signature.batch_size:
            raise ValueError(f"a batch must have {self.signature.batch_size} tensors, like the first one; "
                             f"got {len(batch)}")
        if self._first_step is not None:
            first = self._first_batch_layout
            layout = [(t.dim(), t.dtype) for t in batch]
            if layout != first:
                raise ValueError(f"the batch's structure changed: expected (ndim, dtype) {first}, got {layout}; "
                                 "only the sizes of a batch may change between steps")

    def _example(self, batch, with_lr):
        example = list(self.anchor.values()) + list(self.frozen.values()) + list(self.buffers.values()) + list(batch)
        return example + ([torch.tensor(self.lr, device=self.device)] if with_lr else [])

    def _shape_key(self, batch):
        return tuple((tuple(t.shape), t.dtype, t.device) for t in batch)

    def _step_program(self, batch):
        key = self._shape_key(batch)
        if key not in self._step_programs:
            captured = capture_training_step(self.model, self.loss_fn, self.signature, self._example(batch, True))
            stages, summaries = passes.run_passes(
                captured, passes.halp_passes(self.bits, self.rounding, self.momentum, self.weight_decay))
            final = list(stages.values())[-1]
            program = _Program(final, None, False, stages, summaries)
            if self.compile:
                program = _Program(final, self._inputs(program, batch), True, stages, summaries)
            self._step_programs[key] = program
            if self._first_step is None:
                self._first_step = (program, self._gradient_program(batch))
                self._first_batch_layout = [(t.dim(), t.dtype) for t in batch]
        return self._step_programs[key]

    def _gradient_program(self, batch):
        key = self._shape_key(batch)
        if key not in self._gradient_programs:
            gm = capture_gradient(self.model, self.loss_fn, self.signature, self._example(batch, False))
            program = _Program(gm, None, False)
            if self.compile:
                program = _Program(gm, self._inputs(program, batch), True)
            self._gradient_programs[key] = program
        return self._gradient_programs[key]

    def _inputs(self, program, batch, anchor=None):
        values = []
        for kind, name in program.input_roles:
            if kind == "batch":
                values.append(batch[name])
            elif kind == "param":
                values.append((anchor or self.anchor)[name])
            elif kind == "lr":
                values.append(self._lr_tensor())
            elif kind == "rounding_keys":
                values.append(bit_centering.rounding_keys(self.rounding_counter, len(self.anchor), self.device))
            elif kind == "offset" and name in self._widened_offsets:
                values.append(self.offset[name].to(torch.float32))
            else:
                values.append(self._state(kind)[name])
        return values

    _STATE_ATTRIBUTES = {"anchor": "anchor", "offset": "offset", "scale": "scale", "full_grad": "full_grad",
                         "momentum": "momentum_buffer", "frozen": "frozen", "buffer": "buffers"}

    def _state(self, kind):
        return getattr(self, self._STATE_ATTRIBUTES[kind])

    def _lr_tensor(self):
        # lr may be changed between steps (a schedule): the tensor follows it, made once per value.
        if self._lr_cache[0] != self.lr:
            self._lr_cache = (self.lr, torch.tensor(self.lr, dtype=torch.float32, device=self.device))
        return self._lr_cache[1]

    def _commit(self, results):
        for (kind, name), value in results.items():
            if kind in ("offset", "momentum", "buffer"):
                self._state(kind)[name] = value


def _readable(code):
    """Graph code without the ``x = None`` clean-up statements that only free memory."""
    lines = []
    for line in code.strip().splitlines():
        kept = [s for s in line.split(";") if not _is_cleanup(s)]
        if kept and "".join(kept).strip():
            lines.append(";".join(kept).rstrip())
    return "\n".join(lines)


def _is_cleanup(statement):
    statement = statement.strip()
    return statement.endswith("= None") and all(part.strip().isidentifier() for part in statement[:-len("= None")].split("="))
