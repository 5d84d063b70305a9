"""The two routes to a HALP step, ``halp_fx.transform`` and ``halp_fx.optim.HALP``, run one loop
(``halp_fx/loop.py``): the same training gives the same bits, stats and state on both, including the cases where
they once disagreed (a non-finite batch on a BatchNorm model, stochastic rounding with a frozen tensor)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import halp_fx
from halp_fx.optim import HALP


def batchnorm_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def batches(count=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(count)]


def optim_step(model, opt, x, y):
    def closure(data=x, target=y):
        loss = F.cross_entropy(model(data), target)
        loss.backward()
        return loss
    opt.zero_grad()
    return opt.step(closure)


def poisoned(x):
    x = x.clone()
    x[0, 0] = float("nan")
    return x


def test_a_skipped_nan_batch_leaves_batchnorm_buffers_bit_identical_through_transform():
    data = batches()
    model = batchnorm_model()
    step = halp_fx.transform(model, 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1, T=4, compile=False,
                             on_nonfinite="skip")
    for x, y in data[:2]:
        step(x, y)
    before = {n: b.clone() for n, b in step.buffers.items()}
    step(poisoned(data[2][0]), data[2][1])
    assert step.nonfinite_steps == 1
    assert all(torch.equal(step.buffers[n], b) for n, b in before.items())


def test_a_skipped_nan_batch_leaves_batchnorm_buffers_bit_identical_through_the_optimizer():
    data = batches()
    model = batchnorm_model()
    opt = HALP(model.parameters(), lr=0.1, T=4, data_loader=data, model=model, compile=False, on_nonfinite="skip")
    for x, y in data[:2]:
        optim_step(model, opt, x, y)
    before = {n: b.clone() for n, b in model.named_buffers()}
    weights = [p.detach().clone() for p in model.parameters()]
    optim_step(model, opt, poisoned(data[2][0]), data[2][1])
    assert opt.nonfinite_steps == 1
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    model.eval()
    assert torch.isfinite(model(data[3][0])).all()


def test_stochastic_rounding_with_a_frozen_tensor_gives_the_same_weights_on_both_routes():
    """The rounding keys are numbered over the trainable tensors, in one order, on both routes."""
    data = batches(6)

    def frozen_model():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        model[0].weight.requires_grad_(False)
        return model
    core_model, model = frozen_model(), frozen_model()
    core = halp_fx.transform(core_model, 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1, T=3, mu=0.5,
                             rounding="stochastic", seed=3, compile=False)
    opt = HALP(model.parameters(), lr=0.1, T=3, data_loader=data, mu=0.5, seed=3, model=model, compile=False)
    for _ in range(2):
        for x, y in data:
            core(x, y)
            optim_step(model, opt, x, y)
    trained = dict(model.named_parameters())
    for name, weight in core.weights().items():
        assert torch.equal(weight, trained[name].detach()), name


def test_both_routes_name_the_momentum_state_momentum_buffer_and_the_old_name_still_loads():
    data = batches()
    model = batchnorm_model()
    step = halp_fx.transform(model, 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1, momentum=0.9, T=4,
                             compile=False)
    step(*data[0])
    saved = step.state_dict()
    assert "0.weight.momentum_buffer" in saved and not any(k.endswith(".momentum") for k in saved)
    opt_model = batchnorm_model()
    opt = HALP(opt_model.parameters(), lr=0.1, momentum=0.9, T=4, data_loader=data, model=opt_model, compile=False)
    optim_step(opt_model, opt, *data[0])
    assert all("momentum_buffer" in s for s in opt.state_dict()["state"].values())
    old = {(k[:-len("_buffer")] if k.endswith(".momentum_buffer") else k): v for k, v in saved.items()}
    resumed = halp_fx.transform(batchnorm_model(), 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1,
                                momentum=0.9, T=4, compile=False)
    resumed(*data[0])
    resumed.load_state_dict(old)
    for x, y in data[1:]:
        assert torch.equal(resumed(x, y), step(x, y))
    assert all(torch.equal(resumed.momentum_buffer[n], m) for n, m in step.momentum_buffer.items())


COUNTERS = ("rounding_counter", "steps_since_recenter", "recenters")


@pytest.mark.parametrize("bits", [4, 8])
def test_the_same_training_gives_the_same_weights_stats_and_state_on_both_routes(bits):
    """Momentum, weight decay, mu="auto" (its early recenters below 8 bits), stochastic rounding, three epochs."""
    data = batches(6)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    options = {"lr": 0.05, "T": 3, "mu": "auto", "momentum": 0.9, "weight_decay": 1e-3, "seed": 3}
    core_model, opt_model = model(), model()
    core = halp_fx.transform(core_model, bits, loss_fn=F.cross_entropy, data_loader=data, rounding="stochastic",
                             compile=False, **options)
    opt = HALP(opt_model.parameters(), bits=bits, data_loader=data, model=opt_model, compile=False, **options)
    for _ in range(3):
        for x, y in data:
            assert torch.equal(core(x, y), optim_step(opt_model, opt, x, y))

    trained = dict(opt_model.named_parameters())
    for name, weight in core.weights().items():
        assert torch.equal(weight, trained[name].detach()), name
    assert core.stats() == opt.stats()
    assert bits == 8 or {stat["mu"] for stat in core.stats().values()} != {4.0}   # at 4 bits mu="auto" moved
    saved, opt_saved = core.state_dict(), opt.state_dict()
    per_tensor = {key.rsplit(".", 1)[1] for key in saved if key.count(".") == 2}
    assert all(set(state) - set(COUNTERS) == per_tensor for state in opt_saved["state"].values())
    assert [int(saved[c]) for c in COUNTERS] == [int(opt_saved["state"][0][c]) for c in COUNTERS]
