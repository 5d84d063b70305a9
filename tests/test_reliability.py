"""Bad input gets a clear error; a bad batch never corrupts state; checkpoints resume bit-exactly."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import halp_fx
from models import classification_data, mlp


def make_step(**options):
    torch.manual_seed(0)
    data = classification_data("mlp")
    options = {"loss_fn": F.cross_entropy, "data_loader": data, "lr": 0.1, "mu": 0.5, "compile": False, **options}
    return halp_fx.transform(mlp(), 8, **options), data


def snapshot(step):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in step.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("argument, value, words", [
    ("bits", 1, "bits must be from 2 to 32"), ("bits", 33, "bits must be from 2 to 32"),
    ("bits", 8.0, "bits must be an int"), ("lr", 0.0, "lr must be a finite number > 0"),
    ("lr", float("nan"), "lr must be"), ("T", 0, "T (inner steps between recenters) must be an int >= 1"),
    ("mu", -1.0, "mu must be a finite number > 0"), ("momentum", 1.0, "momentum must be a number in [0, 1)"),
    ("weight_decay", -0.1, "weight_decay must be a finite number >= 0"),
    ("rounding", "up", "rounding must be one of 'stochastic', 'nearest'"),
    ("on_nonfinite", "ignore", "on_nonfinite must be one of 'raise', 'skip'"),
    ("compile", "yes", "compile must be True or False"),
])
def test_bad_hyperparameter_names_the_argument_and_allowed_values(argument, value, words):
    kwargs = {"bits": 8, argument: value}
    with pytest.raises((ValueError, TypeError)) as error:
        halp_fx.transform(mlp(), **kwargs)
    assert words in str(error.value) and repr(value)[:3] in str(error.value)


def test_model_without_trainable_parameters_is_refused():
    model = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        halp_fx.transform(model, 8)


def test_complex_parameter_is_refused_by_name():
    model = mlp()
    model.phase = nn.Parameter(torch.ones(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="'phase' has dtype torch.complex64"):
        halp_fx.transform(model, 8)


def test_integer_parameter_must_be_frozen_and_is_then_an_input():
    model = mlp()
    model.table = nn.Parameter(torch.arange(3), requires_grad=False)
    step = halp_fx.transform(model, 8, loss_fn=F.cross_entropy, compile=False)
    step(*classification_data("mlp")[0])
    assert "table" not in step.anchor and "table" in step.frozen


def test_empty_data_loader_is_refused():
    with pytest.raises(ValueError, match="data_loader is empty"):
        halp_fx.transform(mlp(), 8, data_loader=[])


def test_batch_with_a_different_structure_is_refused():
    step, data = make_step()
    step(*data[0])
    x, y = data[1]
    with pytest.raises(ValueError, match="batch's structure changed"):
        step(x.unsqueeze(1), y)
    with pytest.raises(ValueError, match="a batch must have 2 tensors"):
        step(x)


def test_loss_that_is_not_a_scalar_is_refused():
    step = halp_fx.transform(mlp(), 8, loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"),
                             compile=False)
    with pytest.raises(halp_fx.CaptureError, match="must return a scalar loss.*reduce it with .mean"):
        step(*classification_data("mlp")[0])


def test_uncapturable_model_code_names_the_module_and_what_to_do():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            if x.sum() > 0:  # Python branching on a tensor value
                return self.fc(x)
            return -self.fc(x)

    model = nn.Sequential(DataDependent())
    step = halp_fx.transform(model, 8, loss_fn=F.cross_entropy, compile=False)
    with pytest.raises(halp_fx.CaptureError) as error:
        step(*classification_data("mlp")[0])
    message = str(error.value)
    assert "submodule '0' (DataDependent)" in message and "torch.where" in message


def test_nonfinite_batch_raises_and_leaves_state_untouched():
    step, data = make_step()
    step(*data[0])
    before = snapshot(step)
    x, y = data[1]
    with pytest.raises(halp_fx.NonFiniteError, match="no state was changed"):
        step(x * float("nan"), y)
    after = snapshot(step)
    after["nonfinite_steps"] -= 1
    assert_same_state(before, after)


def test_nonfinite_batch_is_skipped_and_counted_when_asked():
    step, data = make_step(on_nonfinite="skip")
    step(*data[0])
    before = snapshot(step)
    x, y = data[1]
    step(x * float("inf"), y)
    assert step.nonfinite_steps == 1
    after = snapshot(step)
    after["nonfinite_steps"] = 0
    assert_same_state(before, after)


def test_nonfinite_full_gradient_leaves_anchor_offsets_and_scales_untouched():
    step, data = make_step()
    step(*data[0])
    before = snapshot(step)
    x, y = data[0]
    with pytest.raises(halp_fx.NonFiniteError, match="full gradient is NaN/Inf: batch 1 "):
        step.recenter([(x, y), (x * float("nan"), y)])
    assert_same_state(before, snapshot(step))


def test_stats_report_scale_and_saturation_per_tensor():
    step, data = make_step(mu=50.0, lr=1.0)
    for x, y in data:
        step(x, y)
    stats = step.stats()
    assert set(stats) == set(step.anchor)
    assert all(0.0 <= s["saturated"] <= 1.0 and s["scale"] >= 0 for s in stats.values())
    assert max(s["saturated"] for s in stats.values()) > 0.1


def test_heavy_saturation_warns_once_per_recenter():
    step, data = make_step(mu=50.0, lr=1.0)
    for x, y in data:
        step(x, y)
    with pytest.warns(halp_fx.SaturationWarning, match="lower mu or lr") as record:
        step.recenter()
    assert len(record) == 1
    assert record[0].filename == __file__


def test_saturation_warning_from_a_step_points_at_the_callers_line():
    step, data = make_step(mu=50.0, lr=1.0)   # T defaults to len(data)
    for x, y in data:
        step(x, y)
    with pytest.warns(halp_fx.SaturationWarning) as record:
        step(*data[0])   # T steps done: this step recenters first
    assert record[0].filename == __file__


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_checkpoint_round_trip_continues_bit_for_bit(tmp_path, momentum):
    reference, data = make_step(momentum=momentum, T=4)
    resumed, _ = make_step(momentum=momentum, T=4)
    for x, y in data[:3]:
        reference(x, y)
        resumed(x, y)
    path = tmp_path / "step.pt"
    halp_fx.save_checkpoint(resumed.state_dict(), path)
    fresh, _ = make_step(momentum=momentum, T=4)
    fresh.load_state_dict(halp_fx.load_checkpoint(path))
    losses = [(float(reference(x, y)), float(fresh(x, y))) for x, y in data * 2]
    assert all(a == b for a, b in losses)
    assert_same_state(snapshot(reference), snapshot(fresh))


def test_state_dict_from_other_bits_is_refused():
    step, data = make_step()
    step(*data[0])
    other = halp_fx.transform(mlp(), 4, loss_fn=F.cross_entropy, data_loader=data, compile=False)
    with pytest.raises(ValueError, match="saved with bits=8; this step has bits=4"):
        other.load_state_dict(step.state_dict())


def test_state_dict_from_another_model_is_refused_and_changes_nothing():
    step, data = make_step()
    step(*data[0])
    wider = halp_fx.transform(mlp(hidden=32), 8, loss_fn=F.cross_entropy, data_loader=data, compile=False)
    wider(*data[0])
    before = snapshot(wider)
    with pytest.raises(ValueError, match="needs \\(32, 8\\)"):
        wider.load_state_dict(step.state_dict())
    assert_same_state(before, snapshot(wider))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "step.pt"
    halp_fx.save_checkpoint({"version": torch.tensor(1)}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        halp_fx.save_checkpoint({"version": torch.tensor(2)}, path)
    assert int(halp_fx.load_checkpoint(path)["version"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["step.pt"]


def test_parameters_on_several_devices_are_refused():
    model = mlp()
    model[2].to("meta")
    with pytest.raises(ValueError, match="several devices \\(cpu, meta\\).*model.to"):
        halp_fx.transform(model, 8)



@settings(max_examples=8, deadline=None)
@given(hidden=st.integers(1, 12), bits=st.sampled_from([2, 4, 8, 12, None]),
       lr=st.floats(1e-3, 1.0), mu=st.floats(0.05, 50.0), momentum=st.sampled_from([0.0, 0.9]),
       rounding=st.sampled_from(["stochastic", "nearest"]))
def test_any_small_mlp_step_keeps_offsets_in_range_and_finite(hidden, bits, lr, mu, momentum, rounding):
    torch.manual_seed(0)
    data = classification_data("mlp", samples=16, batch=8)
    step = halp_fx.transform(mlp(hidden=hidden), bits, loss_fn=F.cross_entropy, data_loader=data, lr=lr, mu=mu,
                             momentum=momentum, rounding=rounding, compile=False, on_nonfinite="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", halp_fx.SaturationWarning)
        for x, y in data * 3:
            step(x, y)
    for name, z in step.offset.items():
        if bits is not None:
            assert -(2 ** (bits - 1)) <= int(z.min()) and int(z.max()) <= 2 ** (bits - 1) - 1
        assert torch.isfinite(step.weights()[name]).all()


def test_compiled_checkpoint_round_trip_continues_bit_for_bit(tmp_path):
    reference, data = make_step(compile=True, T=4)
    for x, y in data[:3]:
        reference(x, y)
    halp_fx.save_checkpoint(reference.state_dict(), tmp_path / "step.pt")
    fresh, _ = make_step(compile=True, T=4)
    fresh.load_state_dict(halp_fx.load_checkpoint(tmp_path / "step.pt"))
    losses = [(float(reference(x, y)), float(fresh(x, y))) for x, y in data]
    assert all(a == b for a, b in losses)
    assert_same_state(snapshot(reference), snapshot(fresh))
