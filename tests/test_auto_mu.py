"""mu="auto": each tensor's mu is chosen at every recenter from the last epoch's saturation and underflow.

From 8 bits up each tensor moves on its own (halp_fx.auto_mu.next_mu): more than 25% of its offsets at the bounds
halves its mu (a coarser grid); at most 5% at the bounds and more than 90% of its steps below half a grid step
doubles it (a finer grid). Below 8 bits the tensors of a width move together (halp_fx.auto_mu.band_factor), from
their saturation and underflow weighted by size: halved when more than 25% are saturated or fewer than 95% of the
steps underflow, doubled when more than 99% underflow and at most 5% are saturated; and the first epoch is cut by
three early recenters, ceil(T/8) steps apart. mu stays within [0.25, 64]; the first epoch uses 1 at 8 bits, 4 at
4 bits.
"""
import copy
import math
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import halp_fx
from halp_fx import auto_mu, recenter
from halp_fx.optim import HALP
from halp_fx.roles import Role
from models import classification_data, mlp


ROUTES = ["transform", "optim"]


class Training:
    """One HALP training of the test MLP, on either route (``transform`` or ``optim.HALP``), driven alike: every
    behaviour of mu="auto" below is checked on both."""

    def __init__(self, route, bits=8, mu="auto", lr=0.1, data=None):
        torch.manual_seed(0)
        self.route, self.data, self.model = route, classification_data("mlp") if data is None else data, mlp()
        if route == "transform":
            self.halp = halp_fx.transform(self.model, bits, mu=mu, loss_fn=F.cross_entropy, data_loader=self.data,
                                          lr=lr, compile=False)
        else:
            self.halp = HALP(self.model.parameters(), lr=lr, T=len(self.data), data_loader=self.data, mu=mu,
                             bits=bits, model=self.model, compile=False)

    def steps(self, batches):
        for x, y in batches:
            if self.route == "transform":
                self.halp(x, y)
                continue

            def closure(data=x, target=y):
                loss = F.cross_entropy(self.model(data), target)
                loss.backward()
                return loss
            self.halp.zero_grad()
            self.halp.step(closure)

    def epochs(self, count):
        self.steps(self.data * count)

    def stats(self):
        return self.halp.stats()

    @property
    def recenters(self):
        return self.halp.recenters

    def full_grads(self):
        if self.route == "transform":
            return dict(self.halp.state[Role.FULL_GRAD])
        return {n: self.halp.state[p]["full_grad"] for n, p in self.model.named_parameters()}

    def checkpoint(self):
        """A deep copy, as a checkpoint on disk is (torch.optim's state_dict() holds the live state)."""
        if self.route == "transform":
            return copy.deepcopy(self.halp.state_dict())
        return copy.deepcopy((self.model.state_dict(), self.halp.state_dict()))

    def resume(self, checkpoint):
        if self.route == "transform":
            self.halp(*self.data[0])   # a step builds its state; loading then replaces all of it
            self.halp.load_state_dict(checkpoint)
        else:
            self.model.load_state_dict(checkpoint[0])
            self.halp.load_state_dict(checkpoint[1])

    def state(self):
        """Every tensor of the training state by a flat name: weights, the HALP state, the counters."""
        if self.route == "transform":
            return {**{f"weight {n}": w for n, w in self.halp.weights().items()}, **self.halp.state_dict()}
        state = {f"weight {n}": p.detach().clone() for n, p in self.model.named_parameters()}
        saved = self.halp.state_dict()["state"]
        return {**state, **{f"{i}.{k}": v for i, entries in saved.items() for k, v in entries.items()}}


def assert_same_state(expected, got):
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(value, got[key]) if isinstance(value, torch.Tensor) else value == got[key], key


def make_step(bits=8, mu="auto", data=None, **options):
    torch.manual_seed(0)
    data = classification_data("mlp") if data is None else data
    options = {"loss_fn": F.cross_entropy, "data_loader": data, "lr": 0.1, "compile": False, **options}
    return halp_fx.transform(mlp(), bits, mu=mu, **options), data


def run_epochs(step, data, epochs):
    for _ in range(epochs):
        for batch in data:
            step(*batch)


# -- the rule ------------------------------------------------------------------------------------------

def test_a_saturated_tensor_gets_a_coarser_grid():
    assert auto_mu.next_mu(8.0, saturated=0.5, underflow=0.9) == 4.0


def test_an_underflowing_tensor_gets_a_finer_grid():
    assert auto_mu.next_mu(2.0, saturated=0.0, underflow=0.95) == 4.0


def test_a_tensor_neither_saturated_nor_underflowing_keeps_its_mu():
    assert auto_mu.next_mu(2.0, saturated=0.0, underflow=0.8) == 2.0
    assert auto_mu.next_mu(2.0, saturated=0.1, underflow=0.95) == 2.0


def test_mu_stays_within_its_bounds():
    low, high = auto_mu.AUTO_MU_BOUNDS
    assert auto_mu.next_mu(low, saturated=1.0, underflow=0.0) == low
    assert auto_mu.next_mu(high, saturated=0.0, underflow=1.0) == high


def test_without_steps_since_the_last_recenter_mu_stays():
    assert auto_mu.next_mu(2.0, saturated=0.5, underflow=None) == 2.0


def test_below_8_bits_a_grid_finer_than_the_band_coarsens_and_one_coarser_refines():
    assert auto_mu.band_factor(saturated=0.0, underflow=0.9) == 0.5
    assert auto_mu.band_factor(saturated=0.3, underflow=0.999) == 0.5
    assert auto_mu.band_factor(saturated=0.0, underflow=0.995) == 2.0
    assert auto_mu.band_factor(saturated=0.1, underflow=0.995) == 1.0
    assert auto_mu.band_factor(saturated=0.0, underflow=0.97) == 1.0


def test_below_8_bits_the_tensors_of_a_width_move_together_by_their_size_weighted_telemetry():
    def offsets(bits):  # a large tensor near the anchor and a one-entry one at its upper bound
        return [torch.zeros(199, dtype=torch.int8), torch.full((1,), 2 ** (bits - 1) - 1, dtype=torch.int8)]
    # Over 10 steps the large tensor's steps all underflowed, the small one's none: by size, 99.5% underflow.
    sums = [torch.tensor(10.0), torch.tensor(0.0)]
    assert auto_mu.next_mus([4.0, 4.0], offsets(4), sums, 10, [4, 4]) == [8.0, 8.0]
    # At 8 bits the same telemetry moves each tensor on its own: the saturated one coarsens.
    assert auto_mu.next_mus([4.0, 4.0], offsets(8), sums, 10, [8, 8]) == [8.0, 2.0]
    # Widths move apart, and bits=None keeps its mu.
    mixed = [offsets(4)[0], offsets(8)[1], torch.zeros(3)]
    assert auto_mu.next_mus([4.0, 4.0, 0.1], mixed, sums + [torch.tensor(0.0)], 10, [4, 8, None]) == [8.0, 2.0, 0.1]


def recenters_at(T, band, steps=100):
    """The steps (counted from the first recenter) before which a step recenters, by recenter_due."""
    since, at = 0, []
    for taken in range(steps):
        if recenter.recenter_due(since, T, band, lambda: taken):
            at.append(taken)
            since = 0
        since += 1
    return at


def test_below_8_bits_the_first_epoch_has_three_early_recenters():
    # T=40: after 5, 10 and 15 steps, then every 40.
    assert recenters_at(40, band=True) == [5, 10, 15, 55, 95]
    assert recenters_at(40, band=False) == [40, 80]
    assert recenters_at(6, band=True, steps=20) == [1, 2, 3, 9, 15]
    assert recenters_at(1, band=True, steps=5) == [1, 2, 3, 4]


def test_the_first_epoch_mu_is_1_at_8_bits_and_4_at_4_bits():
    assert [auto_mu.first_mu(b) for b in (16, 8, 6, 4, 2)] == [1.0, 1.0, 2.0, 4.0, 8.0]


def test_the_underflow_fraction_counts_steps_below_half_a_grid_step():
    offset = torch.zeros(4, dtype=torch.int8)
    moved = torch.tensor([0.2, -0.49, 0.5, -3.0])
    assert float(halp_fx.bit_centering.underflow_fraction(offset, moved, 8)) == 0.5


# -- on both routes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ROUTES)
def test_auto_starts_from_the_first_epoch_default(route):
    training = Training(route, bits=4)
    training.steps(training.data[:1])
    assert {s["mu"] for s in training.stats().values()} == {4.0}
    norm = float(training.full_grads()["0.weight"].norm())
    assert training.stats()["0.weight"]["scale"] == pytest.approx(norm / (4.0 * 7))


@pytest.mark.parametrize("route", ROUTES)
def test_training_refines_the_grid_of_each_tensor_whose_updates_underflow(route):
    training = Training(route, lr=1e-5)   # every step far below half a grid step, nothing saturates
    training.epochs(1)
    assert {s["mu"] for s in training.stats().values()} == {1.0}
    assert all(s["underflow"] > 0.9 for s in training.stats().values())
    training.steps(training.data[:1])   # recenters first
    assert {s["mu"] for s in training.stats().values()} == {2.0}


@pytest.mark.parametrize("route", ROUTES)
def test_training_coarsens_the_grid_of_each_saturated_tensor(route):
    training = Training(route, lr=10.0)
    training.epochs(1)
    before = training.stats()
    saturated = [n for n, s in before.items() if s["saturated"] > auto_mu.SATURATED_ABOVE]
    assert saturated
    training.steps(training.data[:1])
    after = training.stats()
    assert all(after[n]["mu"] == before[n]["mu"] / 2 for n in saturated)


@pytest.mark.parametrize("route", ROUTES)
def test_stats_report_mu_saturation_and_underflow_per_tensor_by_name(route):
    training = Training(route, mu=0.5)
    training.epochs(1)
    stats = training.stats()
    assert list(stats) == [n for n, _ in training.model.named_parameters()]
    for s in stats.values():
        assert s["mu"] == 0.5 and 0.0 <= s["saturated"] <= 1.0 and 0.0 <= s["underflow"] <= 1.0


@pytest.mark.parametrize("route", ROUTES)
def test_each_recenter_logs_the_epochs_telemetry_and_the_mu_it_chose_at_debug_level(route, caplog):
    training = Training(route, bits=4)   # T=6: recenters at steps 0, 1, 2, 3 (three early ones), then 9
    training.steps(training.data + training.data[:3])
    before, recenters = training.stats(), training.recenters
    assert recenters == 4
    with caplog.at_level(logging.DEBUG, logger="halp_fx"):
        training.steps(training.data[3:4])
    records = [r for r in caplog.records if hasattr(r, "halp_telemetry")]
    assert len(records) == 1 and f"recenter {recenters}:" in records[0].getMessage()
    telemetry = records[0].halp_telemetry
    assert telemetry["recenter"] == recenters
    after, full_grads = training.stats(), training.full_grads()
    assert list(telemetry["tensors"]) == list(after)
    for name, logged in telemetry["tensors"].items():
        assert logged["numel"] == full_grads[name].numel() and logged["bits"] == 4
        assert (logged["mu"], logged["saturated"], logged["underflow"]) == \
            (before[name]["mu"], before[name]["saturated"], before[name]["underflow"])
        assert logged["next_mu"] == after[name]["mu"]
        assert logged["full_grad_norm"] == pytest.approx(float(full_grads[name].norm()))


@pytest.mark.parametrize("route", ROUTES)
def test_the_first_recenter_logs_no_epoch_and_a_numeric_mu_logs_it_unchanged(route, caplog):
    training = Training(route, mu=2.0)
    with caplog.at_level(logging.DEBUG, logger="halp_fx"):
        training.steps(training.data + training.data[:1])
    first, second = [r.halp_telemetry for r in caplog.records if hasattr(r, "halp_telemetry")]
    assert all(t["mu"] is None and t["saturated"] is None for t in first["tensors"].values())
    assert all(t["mu"] == 2.0 and t["next_mu"] == 2.0 for t in second["tensors"].values())


@pytest.mark.parametrize("route", ROUTES)
def test_training_recenters_three_times_early_below_8_bits_only_under_auto(route):
    counts = {}
    for bits, mu in [(4, "auto"), (8, "auto"), (4, 2.0)]:
        training = Training(route, bits=bits, mu=mu)   # 6 batches: T=6, the early recenters 1 step apart
        training.epochs(2)
        counts[bits, mu] = training.recenters
    assert counts == {(4, "auto"): 5, (8, "auto"): 2, (4, 2.0): 2}


@pytest.mark.parametrize("route", ROUTES)
def test_training_resumed_in_the_first_epoch_keeps_its_early_recenters_bit_exact(route):
    data = classification_data("mlp", samples=128)   # T=16: early recenters every 2 steps
    training = Training(route, bits=4, data=data)
    training.steps(data[:3])   # between the first and the second early recenter
    saved = training.checkpoint()
    training.epochs(2)
    resumed = Training(route, bits=4, data=data)
    resumed.resume(saved)
    resumed.epochs(2)
    assert resumed.recenters == training.recenters == 5   # after 0, 2, 4, 6 and 22 steps
    assert_same_state(training.state(), resumed.state())


@pytest.mark.parametrize("route", ROUTES)
def test_a_checkpoint_round_trip_with_auto_is_bit_exact(route):
    training = Training(route, bits=4)
    training.epochs(2)
    training.steps(training.data[:1])
    saved = training.checkpoint()
    training.epochs(2)
    resumed = Training(route, bits=4)
    resumed.resume(saved)
    resumed.epochs(2)
    assert_same_state(training.state(), resumed.state())
    assert training.stats() == resumed.stats()


@pytest.mark.parametrize("route", ROUTES)
def test_auto_is_deterministic(route):
    runs = []
    for _ in range(2):
        training = Training(route, bits=4)
        training.epochs(3)
        runs.append((training.stats(), training.state()))
    assert runs[0][0] == runs[1][0]
    assert_same_state(runs[0][1], runs[1][1])


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("mu", ["Auto", -1, 0.0, math.nan, None])
def test_other_mus_are_refused_naming_the_allowed_values(route, mu):
    with pytest.raises(ValueError, match="mu must be a finite number > 0 or 'auto'"):
        Training(route, mu=mu)


# -- transform ------------------------------------------------------------------------------------------

def test_transform_checkpoint_has_a_mu_per_tensor():
    step, data = make_step(bits=4)
    step(*data[0])
    assert {k for k in step.state_dict() if k.endswith(".mu")} == {f"{n}.mu" for n in step.anchor}


def test_svrg_has_no_grid_and_logs_no_telemetry(caplog):
    step, data = make_step(bits=None, mu=0.1)
    with caplog.at_level(logging.DEBUG, logger="halp_fx"):
        run_epochs(step, data, 2)
    assert not [r for r in caplog.records if hasattr(r, "halp_telemetry")]


def test_the_early_recenters_count_committed_steps_only_and_need_no_data_loader():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    batches = [(x[i:i + 8], x[i:i + 8, :1] * 2) for i in range(0, 64, 8)]
    bad = (batches[0][0].clone(), batches[0][1]); bad[0][0, 0] = float("nan")

    # T=16: early recenters after 2, 4 and 6 committed steps; two skipped NaN steps count for nothing.
    step = halp_fx.transform(nn.Linear(4, 1), 4, loss_fn=F.mse_loss, data_loader=batches, lr=0.05, T=16,
                             mu="auto", compile=False, on_nonfinite="skip")
    for batch in [batches[0], bad, batches[1], bad] + batches[2:7]:
        step(*batch)
    assert (step.nonfinite_steps, step.recenters, step.steps_since_recenter) == (2, 4, 1)

    # Without a data loader they recenter on the step's own batch, like the recenters every T steps.
    step = halp_fx.transform(nn.Linear(4, 1), 4, loss_fn=F.mse_loss, lr=0.05, T=16, mu="auto", compile=False)
    for k in range(20):
        step(*batches[k % 8])
    assert step.recenters == 4  # after 0, 2, 4 and 6 steps; the next is after 22


def test_a_numeric_mu_keeps_the_state_dict_keys():
    step, data = make_step(mu=0.5)
    step(*data[0])
    assert not [k for k in step.state_dict() if k.endswith((".mu", ".underflow"))]


def test_an_auto_checkpoint_is_refused_by_a_numeric_mu_step():
    step, data = make_step()
    step(*data[0])
    numeric, _ = make_step(mu=0.5)
    numeric(*data[0])
    with pytest.raises(ValueError, match="saved with mu='auto'"):
        numeric.load_state_dict(step.state_dict())


def test_a_step_does_not_switch_to_auto_after_transform():
    step, _ = make_step(mu=0.5)
    with pytest.raises(ValueError, match="switches neither to nor from mu='auto'"):
        step.mu = "auto"


def test_auto_at_4_bits_does_not_collapse_where_mu_half_does():
    # Rounding to nearest makes the collapse plain: on mu=0.5's coarse grid most updates round to no change.
    torch.manual_seed(1)
    x = torch.randn(400, 20)
    y = (x @ torch.randn(20, 4)).argmax(1)
    data = [(x[i:i + 40], y[i:i + 40]) for i in range(0, 400, 40)]

    def accuracy(mu):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
        step = halp_fx.transform(model, 4, loss_fn=F.cross_entropy, data_loader=data, lr=0.5, mu=mu,
                                 rounding="nearest", compile=False)
        run_epochs(step, data, 8)
        return float((step.sync_model()(x).argmax(1) == y).float().mean())

    collapsed, auto = accuracy(0.5), accuracy("auto")
    assert collapsed < 0.4
    assert auto > 0.9


# -- halp_fx.optim.HALP ---------------------------------------------------------------------------------

def optimizer_epoch(model, opt, data):
    for x, y in data:
        def closure(data=x, target=y):
            loss = F.cross_entropy(model(data), target)
            loss.backward()
            return loss
        opt.zero_grad()
        opt.step(closure)


def test_optimizer_telemetry_without_a_model_names_parameters_by_position(caplog):
    torch.manual_seed(0)
    data, model = classification_data("mlp"), mlp()
    opt = HALP(model.parameters(), lr=0.1, T=len(data), data_loader=data, mu="auto", bits=4, compile=False)
    with caplog.at_level(logging.DEBUG, logger="halp_fx"):
        optimizer_epoch(model, opt, data)
    records = [r.halp_telemetry for r in caplog.records if hasattr(r, "halp_telemetry")]
    names = [f"param {i}" for i in range(len(list(model.parameters())))]
    assert records and all(list(t["tensors"]) == names for t in records)
    assert list(opt.stats()) == names


def test_optimizer_auto_is_per_group():
    torch.manual_seed(0)
    data = classification_data("mlp")
    model = mlp()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = HALP([{"params": first, "mu": "auto", "bits": 4}, {"params": second, "mu": 0.5}], lr=0.1, T=len(data),
               data_loader=data, compile=False)
    optimizer_epoch(model, opt, data)
    stats = list(opt.stats().values())
    # The 4-bit group's two tensors moved together from 4 (the early recenters); the numeric group kept its mu.
    assert stats[0]["mu"] == stats[1]["mu"] != 4.0 and [s["mu"] for s in stats[2:]] == [0.5, 0.5]
    assert all(0.0 <= s["underflow"] <= 1.0 for s in stats)
    assert "mu" not in opt.state[second[0]]
