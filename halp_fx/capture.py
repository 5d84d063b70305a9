"""Capture: an ``nn.Module`` and its loss become one plain aten-level FX graph, the gradient of a batch.

The graph is traced with ``make_fx`` over a functional step
(``torch.func.functional_call`` + ``torch.func.grad_and_value``; buffers are
passed in and returned, never mutated in place)::

    (params, frozen, buffers, batch) -> (loss, grads, new buffers)

It serves twice: the passes in :mod:`halp_fx.passes` rewrite it into the HALP
step, and the recenter runs it as it is for the full gradient (its buffer
outputs ignored). Every placeholder is named after what it holds and carries
its role (:mod:`halp_fx.roles`); the output node carries its values' roles.
Passes find nodes by role, never by position.
"""
import contextlib
import re
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad_and_value
from torch.fx.experimental.proxy_tensor import make_fx

from .errors import CaptureError
from .roles import OUTPUT_ROLES, ROLE, Role


@dataclass(frozen=True)
class Signature:
    """Which tensors of the model go into a captured graph, in order."""

    param_names: tuple  # trainable floating-point parameters
    frozen_names: tuple  # parameters with requires_grad=False: inputs, never updated
    buffer_names: tuple
    batch_size: int  # number of tensors in a batch

    def input_roles(self):
        return ([(Role.PARAM, n) for n in self.param_names] + [(Role.FROZEN, n) for n in self.frozen_names]
                + [(Role.BUFFER, n) for n in self.buffer_names] + [(Role.BATCH, i) for i in range(self.batch_size)])

    def output_roles(self):
        return [(Role.LOSS, None)] + [(Role.GRAD, n) for n in self.param_names] + [(Role.BUFFER, n) for n in self.buffer_names]


def signature_of(model, batch_size):
    params = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    frozen = tuple(n for n, p in model.named_parameters() if not p.requires_grad)
    buffers = tuple(n for n, _ in model.named_buffers())
    return Signature(params, frozen, buffers, batch_size)


def identifier(name):
    """``"layers.0.weight"`` -> ``"layers_0_weight"``: a Python name for a graph node."""
    name = re.sub(r"\W", "_", str(name))
    return "p" + name if name[0].isdigit() else name


def input_name(role):
    """The placeholder name of a role: ``(PARAM, "fc.weight")`` -> ``fc_weight``, ``(ANCHOR, "fc.weight")`` ->
    ``anchor_fc_weight``, ``(BATCH, 0)`` -> ``batch_0``, ``(LR, None)`` -> ``lr``."""
    kind, name = role
    if name is None:
        return kind.value
    if kind is Role.BATCH:
        return f"batch_{name}"
    if kind in (Role.PARAM, Role.FROZEN, Role.BUFFER):
        return identifier(name)
    return f"{kind.value}_{identifier(name)}"


def _loss_of(model, loss_fn, sig):
    def loss(params, frozen, buffers, batch):
        state = {**dict(zip(sig.param_names, params)), **dict(zip(sig.frozen_names, frozen)),
                 **dict(zip(sig.buffer_names, buffers))}
        with _buffers_after_forward(model) as after:
            if loss_fn is None:
                value = functional_call(model, state, tuple(batch))
            else:
                value = loss_fn(functional_call(model, state, tuple(batch[:-1])), batch[-1])
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            what = type(value).__name__ if not isinstance(value, torch.Tensor) else f"a tensor of shape {tuple(value.shape)}"
            source = "loss_fn" if loss_fn is not None else "the model's forward (loss_fn=None)"
            raise CaptureError(f"{source} must return a scalar loss, got {what}; "
                               "reduce it with .mean() or pass loss_fn=")
        return value.reshape(()), [_updated_buffer(name, passed, after.get(name, passed))
                                   for name, passed in zip(sig.buffer_names, buffers)]
    return loss


@contextlib.contextmanager
def _buffers_after_forward(model):
    """The model's buffers as its forward left them, read by a forward hook while ``functional_call``'s
    substitution is still in place: a buffer that forward reassigned (``self.ema = 0.9 * self.ema + ...``)
    is a new tensor there, and is carried out of the step like one updated in place."""
    after = {}

    def read(module, args, output):
        after.update(module.named_buffers())
    handle = model.register_forward_hook(read)
    try:
        yield after
    finally:
        handle.remove()


def _updated_buffer(name, passed, now):
    if now is passed:
        return passed
    if not isinstance(now, torch.Tensor) or now.shape != passed.shape or now.dtype != passed.dtype:
        got = f"{tuple(now.shape)} {now.dtype}" if isinstance(now, torch.Tensor) else type(now).__name__
        raise CaptureError(f"buffer {name!r} is reassigned in forward to {got}; it was {tuple(passed.shape)} "
                           f"{passed.dtype}. A buffer may change its value, not its shape or dtype")
    return now


def _split(flat, sig):
    p, f, b = len(sig.param_names), len(sig.frozen_names), len(sig.buffer_names)
    params, frozen, buffers = flat[:p], flat[p:p + f], flat[p + f:p + f + b]
    batch = flat[p + f + b:p + f + b + sig.batch_size]
    return params, frozen, [t.clone() for t in buffers], batch


@contextlib.contextmanager
def _module_path_tracker(model):
    """Remembers which submodule was running, so a tracing failure can name it."""
    stack = []
    handles = []
    for name, module in model.named_modules():
        label = f"submodule '{name}' ({type(module).__name__})" if name else f"the model ({type(module).__name__})"

        def enter(module, args, label=label):
            stack.append(label)

        def leave(module, args, output):
            stack.pop()
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _with_named_inputs(gm, roles, output_roles):
    """A copy of ``gm`` whose placeholders are named after their roles and tagged with them.

    The graph is rebuilt (``Graph.graph_copy``) rather than its nodes renamed in
    place, which needs no private FX API on any torch version.
    """
    graph = torch.fx.Graph()
    env = {}
    for node, role in zip([n for n in gm.graph.nodes if n.op == "placeholder"], roles):
        env[node] = graph.placeholder(input_name(role))
        env[node].meta = {**node.meta, ROLE: role}
    out = graph.graph_copy(gm.graph, env)
    output = graph.output(out)
    output.meta[OUTPUT_ROLES] = list(output_roles)
    graph.lint()
    return torch.fx.GraphModule(gm, graph)


def capture_gradient(model, loss_fn, sig, example):
    """Trace ``(params, frozen, buffers, batch) -> (loss, grads, new buffers)`` on ``example``, the flat input list."""
    loss_of = _loss_of(model, loss_fn, sig)

    def gradient(*flat):
        params, frozen, buffers, batch = _split(flat, sig)
        grads, (loss, new_buffers) = grad_and_value(lambda p, b: loss_of(p, frozen, b, batch), has_aux=True)(
            list(params), buffers)
        return (loss, *grads, *new_buffers)

    with _module_path_tracker(model) as stack:
        try:
            gm = make_fx(gradient, tracing_mode="fake")(*example)
        except CaptureError:
            raise
        except Exception as error:
            where = stack[-1] if stack else "the loss function"
            if "_local_scalar_dense" in str(error):  # older torch refuses .item() while tracing, even eagerly
                raise CaptureError(f"{where} reads a tensor's value into Python ({READS_VALUES}), which this "
                                   "torch cannot trace. Rewrite that part with tensor ops (torch.where, masking)") from error
            raise CaptureError(
                f"could not capture the training step: {type(error).__name__} in {where}: "
                f"{str(error).splitlines()[0] if str(error) else ''}\n"
                "The step is traced with make_fx: data-dependent Python control flow "
                "(if/while on tensor values, .item(), .tolist()) and in-place updates of "
                "module attributes cannot be captured. Rewrite that part with tensor ops "
                "(torch.where, masking), or keep it outside the model's forward.") from error
    return _with_named_inputs(gm, sig.input_roles(), sig.output_roles())


READS_VALUES = ".item(), .tolist(), int(tensor)"


def data_dependent_nodes(gm):
    """Nodes that read a tensor's value into Python (``.item()``, ``.tolist()``): eager runs them, Inductor cannot."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten._local_scalar_dense.default]
