"""The training methods compared, behind one small interface the timing loop drives.

A method is built from a fresh model and the epoch's batches; ``start()`` runs
everything up to and including its first step (capture, passes, Inductor, the
first full-gradient pass), ``step(i)`` runs one more inner step on batch ``i``
and returns True when that call also recentered. ``full_gradient_pass()`` (where
there is one) runs just the recenter. ``state_tensors()`` lists what persists
between steps, for the bytes-per-parameter figure.
"""
import os
import warnings

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import halp_fx
from halp_fx import introspection, matrix_work
from halp_fx.capture import capture_gradient, signature_of
from halp_fx.inductor import compile_graph

from .torchhalp_reference import TorchhalpStyleHALP

LR = 0.01
MU = 0.1


def loss_fn(output, target):
    return F.cross_entropy(output, target)


class Method:
    name = ""
    description = ""

    def __init__(self, model, batches, compile):
        self.model, self.batches, self.compile = model, batches, compile

    def start(self):
        raise NotImplementedError

    def step(self, i):
        raise NotImplementedError

    full_gradient_pass = None
    forward_backward_pass = None

    def details(self):
        """Extra facts recorded beside the timings (a dict of strings)."""
        return {}

    def state_tensors(self):
        raise NotImplementedError


class EagerSGD(Method):
    name = "eager_sgd"
    description = "torch.optim.SGD, eager forward/backward"

    def start(self):
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.step(0)

    def step(self, i):
        x, y = self.batches[i]
        self.optimizer.zero_grad()
        loss_fn(self.model(x), y).backward()
        self.optimizer.step()
        return False

    def state_tensors(self):
        tensors = [p for p in self.model.parameters()] + [p.grad for p in self.model.parameters() if p.grad is not None]
        return tensors + [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


class CompiledSGD(Method):
    name = "compiled_sgd"
    description = ("halp_fx.capture.capture_gradient (make_fx) + the update p - lr*g, traced into one graph and "
                   "compiled by Inductor as halp_fx compiles: the plain SGD step")
    autocast = None  # a low-precision dtype to trace the gradient under torch.autocast

    def start(self):
        self.signature = signature_of(self.model, 2)
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        self.params = [params[n].detach().clone() for n in self.signature.param_names]
        self.frozen = [params[n].detach() for n in self.signature.frozen_names]
        self.buffers = [buffers[n].detach().clone() for n in self.signature.buffer_names]
        self.lr = torch.tensor(LR, device=self.params[0].device)
        example = [*self.params, *self.frozen, *self.buffers, *self.batches[0]]
        if self.autocast is None:
            self.gradient = capture_gradient(self.model, loss_fn, self.signature, example)
        else:
            with torch.autocast(self.params[0].device.type, dtype=self.autocast):
                self.gradient = capture_gradient(self.model, loss_fn, self.signature, example)
        gm = sgd_step_graph(self.gradient, len(self.params), [*example, self.lr])
        self.fn = _compile(gm, [*example, self.lr]) if self.compile else gm
        self.step(0)

    def step(self, i):
        out = self.fn(*self.params, *self.frozen, *self.buffers, *self.batches[i], self.lr)
        p = len(self.params)
        self.params, self.buffers = list(out[1:1 + p]), list(out[1 + p:])
        return False

    def forward_backward_pass(self):
        """The reference for a full-gradient pass: the compiled float32 gradient graph over every batch, nothing kept."""
        if not hasattr(self, "gradient_fn"):
            example = [*self.params, *self.frozen, *self.buffers, *self.batches[0]]
            self.gradient_fn = _compile(self.gradient, example) if self.compile else self.gradient
        for batch in self.batches:
            self.gradient_fn(*self.params, *self.frozen, *self.buffers, *batch)

    def details(self):
        return {"matrix_work": matrix_work.describe(matrix_work.matrix_work(self.gradient))}

    def state_tensors(self):
        return list(self.params)


class CompiledSGDBf16Autocast(CompiledSGD):
    name = "compiled_sgd_bf16_autocast"
    description = ("compiled_sgd with the gradient traced under torch.autocast(dtype=torch.bfloat16): products on "
                   "bf16 operands, float32 weights and update")
    autocast = torch.bfloat16
    # Its gradient graph is bf16: the full-gradient passes are float32 and are compared with compiled_sgd's.
    forward_backward_pass = None


def sgd_step_graph(gradient, n_params, example):
    """``(params, frozen, buffers, batch, lr) -> (loss, params - lr*grads, new buffers)``: the captured gradient
    graph and the SGD update traced together (make_fx inlines the graph), so Inductor compiles one graph."""
    def sgd_step(*inputs):
        *gradient_inputs, lr = inputs
        loss, *rest = gradient(*gradient_inputs)
        grads, new_buffers = rest[:n_params], rest[n_params:]
        return (loss, *[p - lr * g for p, g in zip(gradient_inputs, grads)], *new_buffers)
    return make_fx(sgd_step, tracing_mode="fake")(*example)


class TorchhalpEager(Method):
    name = "torchhalp_eager"
    description = "eager float32 HALP simulation written the torchhalp way (benchmarks/torchhalp_reference.py), 8 bits"

    def start(self):
        self.optimizer = TorchhalpStyleHALP(self.model.parameters(), lr=LR, T=len(self.batches),
                                            data_loader=self.batches, mu=MU, bits=8)
        self.step(0)

    def _closure(self, i):
        model = self.model

        def closure(data=self.batches[i][0], target=self.batches[i][1]):
            loss = loss_fn(model(data), target)
            loss.backward()
            return loss
        return closure

    def step(self, i):
        before = self.optimizer.recenters
        self.optimizer.step(self._closure(i))
        return self.optimizer.recenters != before

    def full_gradient_pass(self):
        self.optimizer.recenter(self._closure(0))

    def state_tensors(self):
        return self.optimizer.state_tensors() + [p.grad for p in self.model.parameters() if p.grad is not None]


class Transformed(Method):
    """``halp_fx.transform``: the captured step rewritten by the HALP passes, compiled with Inductor."""
    bits = 8
    arithmetic = "fp32"
    anchor_precision = "fp32"

    def start(self):
        extra = {} if self.arithmetic == "fp32" else {"arithmetic": self.arithmetic}
        if self.anchor_precision != "fp32":
            extra["anchor_precision"] = self.anchor_precision
        self.halp_step = halp_fx.transform(self.model, bits=self.bits, loss_fn=loss_fn, data_loader=self.batches,
                                           lr=LR, mu=MU, compile=self.compile, **extra)
        self.step(0)

    def details(self):
        """What the passes did that a reader of the timings needs (the int8 pass: which products ran int8)."""
        programs = self.halp_step.programs
        final = list(introspection.graphs(programs).values())[-1]
        details = {"matrix_work": matrix_work.describe(matrix_work.matrix_work(final))}
        for name in ("centered_int8", "bf16_anchor"):
            summary = programs.first.summaries.get(name)
            if summary is not None:
                details[name] = summary
        return details

    def step(self, i):
        before = self.halp_step.recenters
        self.halp_step(*self.batches[i])
        return self.halp_step.recenters != before

    def full_gradient_pass(self):
        self.halp_step.recenter()

    def state_tensors(self):
        s = self.halp_step
        tensors = [t for d in (s.anchor, s.offset, s.scale, s.full_grad, s.momentum_buffer) for t in d.values()]
        # The rounding counter was a tensor in earlier versions of the core; it is a Python int now.
        return tensors + [t for t in [getattr(s, "rounding_counter", None)] if isinstance(t, torch.Tensor)]


class CompiledSVRG(Transformed):
    name = "compiled_svrg"
    description = "halp_fx.transform(bits=None): full-precision SVRG through the same graphs"
    bits = None


class CompiledHALP8(Transformed):
    name = "compiled_halp8"
    description = "halp_fx.transform(bits=8), stochastic rounding"
    bits = 8


class CompiledHALP4(Transformed):
    name = "compiled_halp4"
    description = "halp_fx.transform(bits=4), stochastic rounding"
    bits = 4


class CompiledHALP8Int8(Transformed):
    name = "compiled_halp8_int8"
    description = ("halp_fx.transform(bits=8, arithmetic='int8'): each product at W as the anchor's product plus "
                   "int8 products of the differences, where int8 pays on the device (HALP_FX_INT8_PRODUCTS=always "
                   "forces int8)")
    bits = 8
    arithmetic = "int8"


class CompiledHALP8Int8Bf16(Transformed):
    name = "compiled_halp8_int8_bf16"
    description = ("halp_fx.transform(bits=8, arithmetic='int8', anchor_precision='bf16'): the int8 corrections on "
                   "an anchor pass whose products take bf16 operands, where each pays on the device")
    bits = 8
    arithmetic = "int8"
    anchor_precision = "bf16"


class OptimHALP(Method):
    name = "optim_halp"
    description = "halp_fx.optim.HALP (torch.optim-style, closure API, torch.compile'd update), 8 bits"

    def start(self):
        from halp_fx.optim import HALP
        self.optimizer = HALP(self.model.parameters(), lr=LR, T=len(self.batches), data_loader=self.batches,
                              mu=MU, bits=8, model=self.model, compile=self.compile)
        self.first = next(p for p in self.model.parameters() if p.requires_grad)
        self.step(0)

    def _closure(self, i):
        model = self.model

        def closure(data=self.batches[i][0], target=self.batches[i][1]):
            loss = loss_fn(model(data), target)
            loss.backward()
            return loss
        return closure

    def step(self, i):
        counters = self.optimizer.state[self.first]
        recenters = "steps_since_recenter" not in counters or counters["steps_since_recenter"] >= self.optimizer.T
        self.optimizer.step(self._closure(i))
        return recenters

    def state_tensors(self):
        tensors = [p for p in self.model.parameters()] + [p.grad for p in self.model.parameters() if p.grad is not None]
        return tensors + [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def optim_halp_available():
    """None when ``from halp_fx.optim import HALP`` works, else why not."""
    try:
        from halp_fx.optim import HALP  # noqa: F401
    except Exception as error:  # any import failure means: skip the method, say why
        return f"{type(error).__name__}: {error}"
    return None


METHODS = {m.name: m for m in (EagerSGD, CompiledSGD, CompiledSGDBf16Autocast, TorchhalpEager, CompiledSVRG, CompiledHALP8, CompiledHALP4,
                               CompiledHALP8Int8, CompiledHALP8Int8Bf16, OptimHALP)}


def _compile(gm, example):
    # The same Inductor entry point as transform's graphs, so that both find their graphs in the FX graph cache.
    return compile_graph(gm, example)[0]


def _storages(tensors):
    return {(t.untyped_storage().data_ptr(), t.device): t.untyped_storage().nbytes() for t in tensors}


def state_bytes(tensors):
    """Sum of ``nbytes`` over distinct storages, so aliases (``p.grad`` pointing at a buffer) count once."""
    return sum(_storages(tensors).values())


def memory_figures(method, n_params):
    """Bytes per trainable parameter: all persistent state; the same without 0-d tensors (the per-tensor
    scales); and the model's own parameters when the method keeps its state elsewhere and they stay allocated."""
    tensors = method.state_tensors()
    state = _storages(tensors)
    model = _storages(p for p in method.model.parameters() if p.requires_grad)
    return {"state_bytes": sum(state.values()),
            "state_bytes_per_param": sum(state.values()) / n_params,
            "state_bytes_per_param_without_scalars": state_bytes([t for t in tensors if t.dim() > 0]) / n_params,
            "model_parameter_bytes_per_param_outside_state":
                sum(b for k, b in model.items() if k not in state) / n_params}


def quiet_halp_warnings():
    """Random labels and a fixed lr saturate some offsets; the warning says nothing about speed."""
    warnings.filterwarnings("ignore", category=halp_fx.SaturationWarning)


def prepare_step_timing(threads):
    """For a script that times compiled steps in this process: ``threads`` intra-op threads, no warnings that say
    nothing about speed, and Inductor's cache in ``benchmarks/.inductor_cache`` unless one is set."""
    torch.set_num_threads(threads)
    quiet_halp_warnings()
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                  ".inductor_cache"))
