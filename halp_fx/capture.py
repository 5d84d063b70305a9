"""Capture: an ``nn.Module`` and its loss become plain aten-level FX graphs.

Two graphs are captured with ``make_fx`` over a functional step
(``torch.func.functional_call`` + ``torch.func.grad_and_value``, buffers passed
in explicitly and returned updated, never mutated):

* the *training step*: ``(params, frozen, buffers, batch, lr) -> (loss, params - lr * grads, buffers)``,
  the plain SGD step that the passes in :mod:`halp_fx.passes` rewrite into HALP;
* the *gradient*: ``(params, frozen, buffers, batch) -> (loss, grads)``, used by
  recentering for the full gradient; it updates no buffer.

Every placeholder is named after what it holds and carries its role in
``node.meta["halp_role"]`` (``("param", "fc1.weight")``, ``("batch", 0)``, ...);
the output node carries the list of its values' roles. Passes find nodes by
role, never by position.
"""
import contextlib
import re
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad_and_value
from torch.fx.experimental.proxy_tensor import make_fx

ROLE = "halp_role"
OUTPUT_ROLES = "halp_output_roles"


class CaptureError(RuntimeError):
    """The model's training step could not be traced into a graph."""


@dataclass(frozen=True)
class Signature:
    """Which tensors of the model go into a captured graph, in order."""

    param_names: tuple  # trainable floating-point parameters
    frozen_names: tuple  # parameters with requires_grad=False: inputs, never updated
    buffer_names: tuple
    batch_size: int  # number of tensors in a batch


def signature_of(model, batch_size):
    params = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    frozen = tuple(n for n, p in model.named_parameters() if not p.requires_grad)
    buffers = tuple(n for n, _ in model.named_buffers())
    return Signature(params, frozen, buffers, batch_size)


def identifier(name):
    """``"layers.0.weight"`` -> ``"layers_0_weight"``: a Python name for a graph node."""
    name = re.sub(r"\W", "_", name)
    return "p" + name if name[0].isdigit() else name


def _loss_of(model, loss_fn, sig):
    def loss(params, frozen, buffers, batch):
        state = {**dict(zip(sig.param_names, params)), **dict(zip(sig.frozen_names, frozen)),
                 **dict(zip(sig.buffer_names, buffers))}
        if loss_fn is None:
            value = functional_call(model, state, tuple(batch))
        else:
            value = loss_fn(functional_call(model, state, tuple(batch[:-1])), batch[-1])
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            what = type(value).__name__ if not isinstance(value, torch.Tensor) else f"a tensor of shape {tuple(value.shape)}"
            source = "loss_fn" if loss_fn is not None else "the model's forward (loss_fn=None)"
            raise CaptureError(f"{source} must return a scalar loss, got {what}; "
                               "reduce it with .mean() or pass loss_fn=")
        return value.reshape(()), buffers
    return loss


def _split(flat, sig, with_lr):
    p, f, b = len(sig.param_names), len(sig.frozen_names), len(sig.buffer_names)
    params, frozen, buffers = flat[:p], flat[p:p + f], flat[p + f:p + f + b]
    batch = flat[p + f + b:p + f + b + sig.batch_size]
    return params, frozen, [t.clone() for t in buffers], batch, (flat[-1] if with_lr else None)


def _input_roles(sig, with_lr):
    roles = [("param", n) for n in sig.param_names] + [("frozen", n) for n in sig.frozen_names]
    roles += [("buffer", n) for n in sig.buffer_names] + [("batch", i) for i in range(sig.batch_size)]
    return roles + ([("lr", None)] if with_lr else [])


def _role_name(role):
    kind, name = role
    if kind == "batch":
        return f"batch_{name}"
    if kind == "lr":
        return "lr"
    return identifier(name)


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


def _trace(fn, example, model, roles, output_roles):
    with _module_path_tracker(model) as stack:
        try:
            gm = make_fx(fn, tracing_mode="fake")(*example)
        except CaptureError:
            raise
        except Exception as error:
            where = stack[-1] if stack else "the loss function"
            raise CaptureError(
                f"could not capture the training step: {type(error).__name__} in {where}: "
                f"{str(error).splitlines()[0] if str(error) else ''}\n"
                "The step is traced with make_fx: data-dependent Python control flow "
                "(if/while on tensor values, .item(), .tolist()) and in-place updates of "
                "module attributes cannot be captured. Rewrite that part with tensor ops "
                "(torch.where, masking), or keep it outside the model's forward.") from error
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, role in zip(placeholders, roles):
        node.meta[ROLE] = role
        node.target = _role_name(role)
        node._rename(node.target)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.meta[OUTPUT_ROLES] = output_roles
    gm.graph.lint()
    gm.recompile()
    return gm


def capture_training_step(model, loss_fn, sig, example):
    """Trace the plain SGD step. ``example`` is the flat input list (params, frozen, buffers, batch, lr)."""
    loss_of = _loss_of(model, loss_fn, sig)

    def training_step(*flat):
        params, frozen, buffers, batch, lr = _split(flat, sig, with_lr=True)
        grads, (loss, buffers) = grad_and_value(lambda p, b: loss_of(p, frozen, b, batch), has_aux=True)(
            list(params), buffers)
        return (loss, *[p - lr * g for p, g in zip(params, grads)], *buffers)

    out_roles = [("loss", None)] + [("param", n) for n in sig.param_names] + [("buffer", n) for n in sig.buffer_names]
    return _trace(training_step, example, model, _input_roles(sig, True), out_roles)


def capture_gradient(model, loss_fn, sig, example):
    """Trace the mean-loss gradient of one batch. ``example`` is (params, frozen, buffers, batch)."""
    loss_of = _loss_of(model, loss_fn, sig)

    def gradient(*flat):
        params, frozen, buffers, batch, _ = _split(flat, sig, with_lr=False)
        grads, (loss, _) = grad_and_value(lambda p, b: loss_of(p, frozen, b, batch), has_aux=True)(
            list(params), buffers)
        return (loss, *grads)

    out_roles = [("loss", None)] + [("full_grad", n) for n in sig.param_names]
    return _trace(gradient, example, model, _input_roles(sig, False), out_roles)
