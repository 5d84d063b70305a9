"""halp_fx.transform: what a training step does to its state, run eagerly (compile=False) on the same graphs."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import halp_fx
from models import MODELS, SmallCNN, classification_data, mlp


def make_step(kind="mlp", bits=8, **options):
    torch.manual_seed(0)
    model = MODELS[kind]()
    data = classification_data(kind)
    options = {"loss_fn": F.cross_entropy, "data_loader": data, "lr": 0.1, "mu": 0.5, "compile": False, **options}
    return halp_fx.transform(model, bits, **options), model, data


def mean_loss(step, data):
    model = step.sync_model()
    model.eval()
    with torch.no_grad():
        loss = sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in data) / sum(len(y) for _, y in data)
    model.train()
    return float(loss)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_trains_every_model_kind_without_per_model_code(kind):
    step, _, data = make_step(kind, lr=0.2)
    before = mean_loss(step, data)
    for _ in range(6):
        for x, y in data:
            step(x, y)
    assert mean_loss(step, data) < 0.9 * before
    assert all(z.dtype == torch.int8 for z in step.offset.values())


@pytest.mark.parametrize("bits, dtype", [(2, torch.int8), (8, torch.int8), (12, torch.int16), (32, torch.int32),
                                         (None, torch.float32)])
def test_offsets_have_the_promised_dtype(bits, dtype):
    step, _, data = make_step(bits=bits)
    step(*data[0])
    assert {z.dtype for z in step.offset.values()} == {dtype}


def test_no_float32_copy_of_the_weights_is_kept_between_steps():
    step, model, data = make_step()
    for x, y in data:
        step(x, y)
    per_param = {key.rsplit(".", 1)[1] for key, value in step.state_dict().items()
                 if isinstance(value, torch.Tensor) and key.rsplit(".", 1)[0] in step.anchor}
    assert per_param == {"anchor", "offset", "scale", "full_grad"}
    elementwise = [t for t in step.state_dict().values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    parameters = sum(a.numel() for a in step.anchor.values())
    assert sum(t.nbytes for t in elementwise) == 9 * parameters  # anchor 4 + int8 offset 1 + full_grad 4
    # ... and the module's own float32 parameters are released once a step has run
    assert sum(p.numel() for p in model.parameters()) == 0


def test_weights_are_anchor_plus_scale_times_offset():
    step, _, data = make_step()
    for x, y in data:
        step(x, y)
    for name, w in step.weights().items():
        expected = step.anchor[name] + step.scale[name] * step.offset[name].float()
        torch.testing.assert_close(w, expected, rtol=0, atol=0)


def test_recenters_first_and_every_T_steps():
    step, _, data = make_step(T=4)
    for i, (x, y) in enumerate(data):  # 6 batches: recenters before steps 0 and 4
        step(x, y)
    assert step.recenters == 2 and step.steps_since_recenter == 2


def test_recenter_moves_the_anchor_to_the_weights_and_zeroes_offsets():
    step, _, data = make_step()
    for x, y in data[:3]:
        step(x, y)
    weights = step.weights()
    step.recenter()
    for name, w in weights.items():
        torch.testing.assert_close(step.anchor[name], w, rtol=0, atol=0)
        assert not step.offset[name].any()


def test_full_gradient_weights_batches_by_their_size():
    step, model, data = make_step()
    short = [(x[:3], y[:3]) for x, y in data[:1]] + data[1:2]
    step.recenter(short)
    x = torch.cat([b[0] for b in short])
    y = torch.cat([b[1] for b in short])
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(step.full_grad[name], p.grad, rtol=1e-5, atol=1e-6)


def test_scale_follows_the_full_gradient_norm():
    step, _, data = make_step(bits=4, mu=3.0)
    step(*data[0])
    for name, g in step.full_grad.items():
        assert math.isclose(float(step.scale[name]), float(g.norm()) / (3.0 * 7), rel_tol=1e-5)


def test_tensor_with_zero_full_gradient_keeps_a_zero_offset_and_no_nan():
    torch.manual_seed(0)
    model = mlp()
    model.unused = nn.Parameter(torch.ones(3))
    data = classification_data("mlp")
    step = halp_fx.transform(model, 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1, compile=False)
    for x, y in data:
        step(x, y)
    assert float(step.scale["unused"]) == 0.0
    assert not step.offset["unused"].any()
    assert all(torch.isfinite(w).all() for w in step.weights().values())


def test_short_last_batch_gets_its_own_graph_and_trains():
    step, _, data = make_step()
    x, y = data[0]
    step(x, y)
    loss = step(x[:5], y[:5])
    assert torch.isfinite(loss) and step.steps_since_recenter == 2
    shapes = [key[0][0] for key in step.programs.entries]
    assert shapes == [(8, 8), (5, 8)]
    assert all(entry.step is not None for entry in step.programs.entries.values())


def test_batchnorm_statistics_move_only_in_the_pass_at_the_weights():
    torch.manual_seed(0)
    model = SmallCNN()
    data = classification_data("cnn")
    step = halp_fx.transform(model, 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1, compile=False)
    twin = SmallCNN()
    twin.load_state_dict(model.state_dict())
    x, y = data[0]
    step(x, y)  # the recenter's full-gradient pass runs first and must not count
    twin(x)     # one plain training-mode forward at the same weights
    torch.testing.assert_close(step.buffers["bn.running_mean"], twin.bn.running_mean)
    torch.testing.assert_close(step.buffers["bn.running_var"], twin.bn.running_var)
    assert int(step.buffers["bn.num_batches_tracked"]) == 1


def test_model_that_returns_its_loss_needs_only_model_and_bits():
    class Regression(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 1)

        def forward(self, x, y):
            return F.mse_loss(self.linear(x), y)

    torch.manual_seed(0)
    x = torch.randn(16, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    step = halp_fx.transform(Regression(), bits=8)
    first = float(step(x, y))
    for _ in range(30):
        last = float(step(x, y))
    assert last < first


def test_momentum_and_weight_decay_add_state_and_change_the_trajectory():
    plain, _, data = make_step()
    shaped, _, _ = make_step(momentum=0.9, weight_decay=0.01)
    for x, y in data:
        plain(x, y)
        shaped(x, y)
    assert set(shaped.momentum_buffer) == set(shaped.anchor)
    assert any(not torch.equal(plain.offset[n], shaped.offset[n]) for n in plain.offset)


def test_sync_model_writes_weights_and_buffers_into_the_module():
    step, model, data = make_step("cnn")
    for x, y in data:
        step(x, y)
    returned = step.sync_model()
    assert returned is model
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), step.weights()[name], rtol=0, atol=0)
    torch.testing.assert_close(model.bn.running_mean, step.buffers["bn.running_mean"], rtol=0, atol=0)


def test_stochastic_rounding_depends_on_the_seed_only():
    a, _, data = make_step(seed=1)
    b, _, _ = make_step(seed=1)
    c, _, _ = make_step(seed=2)
    for x, y in data:
        a(x, y), b(x, y), c(x, y)
    assert all(torch.equal(a.offset[n], b.offset[n]) for n in a.offset)
    assert any(not torch.equal(a.offset[n], c.offset[n]) for n in a.offset)


def test_lr_can_be_changed_between_steps_without_recapture():
    fast, _, data = make_step(rounding="nearest")
    slow, _, _ = make_step(rounding="nearest")
    fast(*data[0]), slow(*data[0])
    slow.lr = 1e-6
    fast(*data[1]), slow(*data[1])
    assert len(slow.programs.entries) == 1
    assert any(slow.offset[n].abs().sum() < fast.offset[n].abs().sum() for n in fast.offset)


def test_explain_lists_every_pass_and_the_final_graph():
    step, _, data = make_step()
    step(*data[0])
    text = step.explain()
    for stage in ("captured", "dequantize_weights", "svrg_correction", "offset_update", "nonfinite_guard"):
        assert stage in text
    assert "the recenter runs it as it is for the full gradient" in text
    assert "def forward(self, anchor_p0_weight, offset_p0_weight, scale_p0_weight" in text
    assert "= None" not in text


def test_graphs_are_ordered_captured_then_one_per_pass():
    step, _, data = make_step()
    step(*data[0])
    assert list(step.graphs) == ["captured", "dequantize_weights", "svrg_correction", "offset_update",
                                 "nonfinite_guard"]
    assert all(isinstance(gm, torch.fx.GraphModule) for gm in step.graphs.values())


def test_dump_writes_every_stage(tmp_path):
    step, _, data = make_step()
    step(*data[0])
    written = step.dump(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in written] == [
        "00_captured.py", "01_dequantize_weights.py", "02_svrg_correction.py", "03_offset_update.py",
        "04_nonfinite_guard.py"]
    assert "offset_update(" in (tmp_path / "03_offset_update.py").read_text()


def test_bits_none_is_svrg_through_the_same_graphs():
    step, _, data = make_step(bits=None)
    for x, y in data:
        step(x, y)
    assert all(float(d) == 1.0 for d in step.scale.values())
    assert "rounding" not in step.explain().split("final step graph")[1].split("def forward")[0]
