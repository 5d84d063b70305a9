"""halp_fx.optim.HALP and SVRG: torchhalp's optimizers, with the core's arithmetic."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import halp_fx
from halp_fx.optim import HALP, SVRG
from models import SmallCNN, classification_data, mlp


def regression_data(kind, samples=12, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    if kind == "logistic":
        y = (y > 0).float()
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, samples, batch)]


REGRESSION_LOSS = {"linear": F.mse_loss, "logistic": F.binary_cross_entropy_with_logits}


def linear_model(seed=1):
    torch.manual_seed(seed)
    return nn.Linear(3, 1)


def make_closure(model, loss_fn, data, target):
    def closure(data=data, target=target):
        loss = loss_fn(model(data), target)
        loss.backward()
        return loss
    return closure


def train(model, opt, batches, loss_fn=F.cross_entropy):
    losses = []
    for data, target in batches:
        opt.zero_grad()
        losses.append(opt.step(make_closure(model, loss_fn, data, target)).item())
    return losses


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


# -- the same steps as the core and as SVRG written out ----------------------------------------------------

@pytest.mark.parametrize("bits", [8, None], ids=["halp", "svrg"])
@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_matches_the_core_transform_step_for_step(kind, bits):
    data = regression_data(kind)
    hyper = dict(lr=0.05, T=5, momentum=0.5, weight_decay=0.01)
    core_model, model = linear_model(), linear_model()
    core = halp_fx.transform(core_model, bits, loss_fn=REGRESSION_LOSS[kind], data_loader=data, mu=0.5,
                             rounding="nearest", compile=False, **hyper)
    if bits is None:
        opt = SVRG(model.parameters(), data_loader=data, compile=False, **hyper)
    else:
        opt = HALP(model.parameters(), data_loader=data, mu=0.5, bits=bits, biased=True, compile=False, **hyper)
    for x, y in data * 2:
        core(x, y)
        opt.zero_grad()
        opt.step(make_closure(model, REGRESSION_LOSS[kind], x, y))
    core_weights = core.weights()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), core_weights[name], rtol=1e-4, atol=1e-6)


def test_svrg_matches_svrg_written_out_from_the_paper():
    data = regression_data("linear", samples=6, batch=2)
    lr, T, weight_decay, momentum = 0.1, 2, 0.01, 0.5
    model = linear_model()
    opt = SVRG(model.parameters(), lr=lr, T=T, data_loader=data, weight_decay=weight_decay, momentum=momentum,
               compile=False)
    train(model, opt, data * 2, loss_fn=F.mse_loss)

    def grad(w, x, y):
        w = [t.clone().requires_grad_() for t in w]
        return torch.autograd.grad(F.mse_loss(x @ w[0].T + w[1], y), w)

    w = [p.detach().clone() for p in linear_model().parameters()]
    velocity = [torch.zeros_like(t) for t in w]
    for step, (x, y) in enumerate(data * 2):
        if step % T == 0:
            anchor = [t.clone() for t in w]
            full = [sum(g) / len(data) for g in zip(*(grad(anchor, *batch) for batch in data))]
        u = [g - ga + G + weight_decay * t for g, ga, G, t in zip(grad(w, x, y), grad(anchor, x, y), full, w)]
        velocity = [momentum * v + d for v, d in zip(velocity, u)]
        w = [t - lr * v for t, v in zip(w, velocity)]
    for p, expected in zip(model.parameters(), w):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_parameters_hold_anchor_plus_scale_times_offset_after_each_step():
    batches = classification_data("mlp", samples=32, batch=8)
    model = mlp()
    opt = HALP(model.parameters(), lr=0.1, T=3, data_loader=batches, mu=2.0, compile=False)
    for data, target in batches:
        train(model, opt, [(data, target)])
        for p in model.parameters():
            state = opt.state[p]
            assert torch.equal(p.detach(), state["anchor"] + state["scale"] * state["offset"].float())


def test_full_gradient_weights_each_batch_by_its_number_of_examples():
    x, y = regression_data("linear", samples=4, batch=4)[0]
    uneven = [(x[:3], y[:3]), (x[3:], y[3:])]
    model, reference = linear_model(), linear_model()
    opt = SVRG(model.parameters(), lr=0.1, T=10, data_loader=uneven, compile=False)
    train(model, opt, uneven[:1], loss_fn=F.mse_loss)
    F.mse_loss(reference(x), y).backward()
    for p, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(opt.state[p]["full_grad"], expected.grad)


# -- torchhalp's README, BatchNorm and buffers -----------------------------------------------------------

def test_torchhalp_readme_snippet_trains_a_cnn_with_batchnorm():
    batches = classification_data("cnn", samples=48, batch=8)
    dataset = torch.utils.data.TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    train_loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    torch.manual_seed(0)
    model = SmallCNN()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = HALP(model.parameters(), lr=0.1, T=len(train_loader), data_loader=train_loader,
                     weight_decay=5e-4, mu=20.0, bits=8, compile=False)
    epoch_losses = []
    for epoch in range(3):
        losses = []
        for data, target in train_loader:
            def closure(data=data, target=target):
                output = model(data)
                loss = loss_fn(output, target)
                loss.backward()
                return loss
            optimizer.zero_grad()
            losses.append(optimizer.step(closure).item())
        epoch_losses.append(sum(losses) / len(losses))
    assert epoch_losses[-1] < 0.7 * epoch_losses[0]


def test_running_statistics_move_only_in_the_pass_at_the_current_weights():
    batches = classification_data("cnn", samples=16, batch=8)
    torch.manual_seed(0)
    model = SmallCNN()
    opt = HALP(model.parameters(), lr=0.1, T=5, data_loader=batches, mu=20.0, compile=False)
    for data, target in batches:
        plain = copy.deepcopy(model)
        with torch.no_grad():
            plain(data)
        train(model, opt, [(data, target)])
        for (name, expected), actual in zip(plain.named_buffers(), model.buffers()):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)
    assert int(model.bn.num_batches_tracked) == len(batches)


def test_model_argument_keeps_buffers_when_the_closure_does_not_name_the_model():
    batches = classification_data("cnn", samples=16, batch=8)
    torch.manual_seed(0)
    holder = {"model": SmallCNN()}
    data, target = batches[0]
    plain = copy.deepcopy(holder["model"])
    with torch.no_grad():
        plain(data)

    def closure(data=data, target=target):
        loss = F.cross_entropy(holder["model"](data), target)
        loss.backward()
        return loss
    opt = HALP(holder["model"].parameters(), lr=0.1, T=5, data_loader=batches, model=holder["model"], compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
    torch.testing.assert_close(holder["model"].bn.running_mean, plain.bn.running_mean, rtol=0, atol=0)


def test_warns_once_when_it_finds_no_module_for_the_buffers():
    batches = classification_data("cnn", samples=16, batch=8)
    holder = {"model": SmallCNN()}
    opt = HALP(holder["model"].parameters(), lr=0.1, T=5, data_loader=batches, compile=False)

    def step(data, target):
        def closure(data=data, target=target):
            loss = F.cross_entropy(holder["model"](data), target)
            loss.backward()
            return loss
        opt.step(closure)
    with pytest.warns(UserWarning, match="pass model=model") as caught:
        for data, target in batches:
            step(data, target)
    assert len(caught) == 1


# -- torch.optim behaviour ---------------------------------------------------------------------------

def test_each_param_group_has_its_own_offset_dtype_lr_and_mu():
    batches = classification_data("mlp", samples=16, batch=8)
    model = mlp()
    first, last = model[0], model[2]
    opt = HALP([{"params": first.parameters(), "bits": 4, "lr": 0.5, "mu": 10.0},
                {"params": last.parameters(), "bits": 12, "lr": 0.1}],
               lr=0.01, T=5, data_loader=batches, mu=1.0, biased=True, compile=False)
    train(model, opt, batches[:1])
    # At the first step W is the anchor, so the corrected gradient is the full gradient G.
    for group in opt.param_groups:
        low, high = -2 ** (group["bits"] - 1), 2 ** (group["bits"] - 1) - 1
        for p in group["params"]:
            state = opt.state[p]
            G = state["full_grad"]
            d = torch.linalg.vector_norm(G) / (group["mu"] * high)
            assert state["offset"].dtype == {4: torch.int8, 12: torch.int16}[group["bits"]]
            torch.testing.assert_close(state["scale"], d)
            expected = torch.clamp(torch.floor(-(group["lr"] * G) * (1 / d) + 0.5), low, high)
            assert torch.equal(state["offset"].float(), expected)
            assert state["offset"].abs().max() > 1


def test_a_scheduler_sets_the_lr_of_each_step():
    batches = classification_data("mlp", samples=64, batch=8)
    model = mlp()
    opt = HALP(model.parameters(), lr=0.1, T=4, data_loader=batches, mu=2.0, compile=False)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.0)
    trajectory = [weights(model)]
    for data, target in batches:
        train(model, opt, [(data, target)])
        scheduler.step()
        trajectory.append(weights(model))
    assert not torch.equal(trajectory[0][0], trajectory[3][0])
    for later in trajectory[4:]:
        assert all(torch.equal(a, b) for a, b in zip(later, trajectory[3]))


def test_state_dict_round_trip_mid_epoch_continues_bit_identically(tmp_path):
    batches = classification_data("mlp", samples=48, batch=8)

    def setup(seed):
        torch.manual_seed(seed)
        model = mlp()
        opt = HALP(model.parameters(), lr=0.1, T=4, data_loader=batches, momentum=0.9, weight_decay=1e-3, mu=2.0,
                   seed=3, compile=False)
        return model, opt
    model, opt = setup(0)
    train(model, opt, batches * 2)

    model, opt = setup(0)
    train(model, opt, batches + batches[:1])
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "checkpoint.pt")
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed_model, resumed = setup(1)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    train(resumed_model, resumed, batches[1:])

    reference_model, reference = setup(0)
    train(reference_model, reference, batches * 2)
    for p, q in zip(resumed_model.parameters(), reference_model.parameters()):
        assert torch.equal(p, q)
        for key, value in reference.state[q].items():
            assert torch.equal(torch.as_tensor(resumed.state[p][key]), torch.as_tensor(value)), key
            assert torch.as_tensor(resumed.state[p][key]).dtype == torch.as_tensor(value).dtype, key


def test_zero_grad_with_or_without_set_to_none_gives_the_same_trajectory():
    batches = classification_data("mlp", samples=32, batch=8)
    results = []
    for set_to_none in (True, False):
        torch.manual_seed(0)
        model = mlp()
        opt = HALP(model.parameters(), lr=0.1, T=3, data_loader=batches, momentum=0.5, mu=2.0, compile=False)
        for data, target in batches * 2:
            opt.zero_grad(set_to_none=set_to_none)
            opt.step(make_closure(model, F.cross_entropy, data, target))
        results.append(weights(model))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_unbiased_is_torchhalps_name_for_stochastic_rounding():
    batches = classification_data("mlp", samples=32, batch=8)
    trajectories = {}
    for name, kwargs in {"unbiased": dict(unbiased=True), "stochastic": dict(biased=False),
                         "not unbiased": dict(unbiased=False), "nearest": dict(biased=True)}.items():
        torch.manual_seed(0)
        model = mlp()
        opt = HALP(model.parameters(), lr=0.1, T=3, data_loader=batches, mu=2.0, compile=False, **kwargs)
        train(model, opt, batches)
        trajectories[name] = weights(model)
    assert all(torch.equal(a, b) for a, b in zip(trajectories["unbiased"], trajectories["stochastic"]))
    assert all(torch.equal(a, b) for a, b in zip(trajectories["not unbiased"], trajectories["nearest"]))
    assert not all(torch.equal(a, b) for a, b in zip(trajectories["unbiased"], trajectories["nearest"]))


def test_compiled_update_matches_eager():
    batches = classification_data("mlp", samples=32, batch=8)
    results = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = mlp()
        opt = HALP([{"params": model[0].parameters(), "bits": 8}, {"params": model[2].parameters(), "bits": 16}],
                   lr=0.1, T=3, data_loader=batches, momentum=0.5, weight_decay=1e-3, mu=2.0, compile=compile)
        train(model, opt, batches * 2)
        results.append((weights(model), [opt.state[p]["offset"] for p in model.parameters()]))
    (eager_weights, eager_offsets), (compiled_weights, compiled_offsets) = results
    for eager, compiled in zip(eager_offsets, compiled_offsets):
        assert compiled.dtype == eager.dtype
        assert (compiled.int() - eager.int()).abs().max() <= 1
    for eager, compiled in zip(eager_weights, compiled_weights):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_repr_names_the_optimizer_T_and_each_group():
    batches = classification_data("mlp", samples=16, batch=8)
    text = repr(HALP(mlp().parameters(), lr=0.1, T=7, data_loader=batches, bits=4, compile=False))
    assert text.startswith("HALP (")
    assert "T: 7" in text and "2 batches" in text and "bits: 4" in text and "Parameter Group 0" in text
    assert "bits" not in repr(SVRG(mlp().parameters(), lr=0.1, T=7, data_loader=batches, compile=False))


# -- errors name what is wrong --------------------------------------------------------------------------

BATCHES = classification_data("mlp", samples=16, batch=8)


def halp(**kwargs):
    arguments = dict(lr=0.1, T=3, data_loader=BATCHES, compile=False)
    return HALP(mlp().parameters(), **{**arguments, **kwargs})


@pytest.mark.parametrize("make, error, message", [
    (lambda: halp(T=0), ValueError, "T .* must be an int >= 1"),
    (lambda: halp(bits=40), ValueError, "bits must be from 2 to 32"),
    (lambda: halp(bits=1), ValueError, "bits must be from 2 to 32"),
    (lambda: halp(lr=-1.0), ValueError, "lr must be a finite number > 0"),
    (lambda: halp(momentum=1.0), ValueError, r"momentum must be a number in \[0, 1\)"),
    (lambda: halp(mu=0.0), ValueError, "mu must be a finite number > 0"),
    (lambda: halp(data_loader=[]), ValueError, "data_loader is empty"),
    (lambda: halp(data_loader=None), TypeError, "data_loader is required"),
    (lambda: halp(model=lambda x: x), TypeError, "model must be the torch.nn.Module"),
    (lambda: halp(biased=True, unbiased=True), ValueError, "contradict"),
    (lambda: HALP([{"params": mlp().parameters()}, {"params": nn.Linear(2, 2).parameters(), "bits": 0}],
                  lr=0.1, T=3, data_loader=BATCHES), ValueError, "parameter group 1: bits must be from 2 to 32"),
    (lambda: halp().step(), TypeError, r"step\(\) needs the closure"),
    (lambda: halp().step(lambda: None), TypeError, r"closure\(data, target\)"),
], ids=["T", "bits too many", "bits too few", "lr", "momentum", "mu", "empty data_loader", "no data_loader",
        "model", "biased and unbiased", "group bits", "no closure", "closure without arguments"])
def test_errors_name_what_is_wrong(make, error, message):
    with pytest.raises(error, match=message):
        make()
