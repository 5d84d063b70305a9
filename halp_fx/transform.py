"""``halp_fx.transform``: the one call that turns a model into a compiled HALP training step."""
import torch

from . import arguments, distributed
from .training_step import TrainingStep, is_released


def transform(model, bits=8, *, loss_fn=None, data_loader=None, lr=0.01, T=None, mu=0.1, momentum=0.0,
              weight_decay=0.0, rounding="stochastic", compile=True, on_nonfinite="raise", seed=0,
              saturation_warning=0.1, arithmetic="fp32", anchor_precision="fp32", process_group=None):
    """Capture ``model``'s training step, rewrite it into HALP and compile it.

    Args:
        model: a float32 ``nn.Module``. Its trainable parameters are taken over by
            the returned step (the module's own copies are released after the
            first step); read them back with ``step.weights()`` or ``step.sync_model()``.
        bits: offset width, 2..32 (int8 offsets up to 8, int16 up to 16, else
            int32), or ``None`` for full-precision SVRG through the same graphs.
        loss_fn: ``loss_fn(model(*batch[:-1]), batch[-1])``; with ``None`` the
            model's forward takes the whole batch and returns the scalar loss.
        data_loader: batches for the full gradient. The step recenters on its
            first call and then every ``T`` steps (``T=None``: ``len(data_loader)``).
            Without one, the first call recenters on its own batch, and later
            recenters happen every ``T`` steps on the current batch (if ``T`` is
            set) or when you call ``step.recenter(batches)``.
        lr, mu, momentum, weight_decay, rounding: as in the HALP paper; see
            :mod:`halp_fx.bit_centering` for the exact arithmetic. ``mu="auto"`` sets each
            tensor's mu at every recenter from the epoch's saturation and underflow
            (:func:`halp_fx.auto_mu.next_mus`); below 8 bits it also recenters three times early in
            the first epoch, each ``ceil(T/8)`` steps after the last (:func:`halp_fx.recenter.recenter_due`).
        compile: compile the graphs with Inductor; ``False`` runs the same graphs eagerly.
        on_nonfinite: ``"raise"`` a :class:`NonFiniteError` or ``"skip"`` a step
            whose loss, corrected gradient, update or new buffer is NaN/Inf; either
            way no state changes. A non-finite full gradient always raises.
        seed: start of the stochastic-rounding counter.
        arithmetic: ``"fp32"`` runs the step's matrix products in float32 on ``W = A + d*Z``; ``"int8"`` runs
            each product at W as the anchor's product plus int8 products of the differences
            (:mod:`halp_fx.centered_int8`), where int8 pays on the device (``explain()`` lists each product).
        anchor_precision: ``"fp32"``, or ``"bf16"`` (with ``arithmetic="int8"``): the anchor products that centered
            products are built on take bf16 operands, where bf16 pays on the device (:mod:`halp_fx.bf16_anchor`).
            The full gradient stays float32.
        process_group: data parallelism over ``torch.distributed`` (:mod:`halp_fx.distributed`). ``None``: over
            the default group when ``torch.distributed`` is initialized with several processes; ``False``: never;
            or a ``ProcessGroup``. Each rank passes its own shard as ``data_loader`` (a ``DistributedSampler``);
            the step then returns the loss averaged over the ranks.
        saturation_warning: at each recenter, warn (:class:`SaturationWarning`)
            when more than this fraction of all offsets sit at the integer bounds.

    Returns:
        a :class:`halp_fx.training_step.TrainingStep`; ``step(*batch)`` runs one
        inner step and returns the loss.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    checked = arguments.check_transform_arguments(bits, lr, mu, T, momentum, weight_decay, rounding, on_nonfinite,
                                                  data_loader, seed, saturation_warning, loss_fn, compile,
                                                  arithmetic, anchor_precision)
    trainable = arguments.check_parameters(model.named_parameters())
    arguments.check_float32_parameters(trainable)
    held = [n for n, p in trainable if is_released(p)]
    if held:
        raise ValueError(f"the model's parameters ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}) are held "
                         "by another halp_fx step: call that step's sync_model() first, so the module has its weights")
    return TrainingStep(model, **checked, process_group=distributed.resolve_process_group(process_group))
