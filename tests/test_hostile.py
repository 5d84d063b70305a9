"""Regression tests for what a hostile try-out found: each fails on the code before its fix.

Every item ends as the right result or a clear error that says what to do.
"""
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils.data import DataLoader, TensorDataset

import halp_fx
from halp_fx.optim.functional import halp_inner_steps
import halp_fx.passes
from halp_fx.optim import HALP, SVRG
from models import SmallCNN, classification_data, mlp

TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_step(model=None, data=None, **options):
    torch.manual_seed(0)
    data = classification_data("mlp") if data is None else data
    options = {"loss_fn": F.cross_entropy, "data_loader": data, "lr": 0.1, "mu": 0.5, "compile": False, **options}
    return halp_fx.transform(mlp() if model is None else model, 8, **options), data


def snapshot(step):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in step.state_dict().items()}


def assert_same(a, b, counted_failures=0):
    """The same state, but for ``nonfinite_steps``, which counts the failed steps in between."""
    assert a.keys() == b.keys()
    if "nonfinite_steps" in a:
        assert b["nonfinite_steps"] - a["nonfinite_steps"] == counted_failures
    for key in a.keys() - {"nonfinite_steps"}:
        same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        assert same, key


def optimizer_state(opt):
    return {(i, k): (v.clone() if isinstance(v, torch.Tensor) else v)
            for i, p in enumerate(opt.param_groups[0]["params"]) for k, v in opt.state[p].items()}


def closure_for(model, x, y):
    def closure(data=x, target=y):
        loss = F.cross_entropy(model(data), target)
        loss.backward()
        return loss
    return closure


# -- 1. persistent workers --------------------------------------------------------------------------------

def persistent_loader():
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=4, num_workers=1, persistent_workers=True)


def test_a_persistent_worker_loader_keeps_every_step_of_the_users_epoch():
    loader = persistent_loader()
    step, _ = make_step(data=loader)
    steps = []
    for _ in range(2):
        count = 0
        for x, y in loader:
            step(x, y)
            count += 1
        steps.append(count)
    assert steps == [len(loader)] * 2 and step.recenters == 2


def test_the_optimizer_with_a_persistent_worker_loader_keeps_every_step_of_the_epoch():
    loader = persistent_loader()
    torch.manual_seed(0)
    model = mlp()
    opt = HALP(model.parameters(), lr=0.1, T=len(loader), data_loader=loader, mu=0.5, compile=False)
    counts = []
    for _ in range(2):
        counts.append(sum(1 for x, y in loader if opt.step(closure_for(model, x, y)) is not None))
    assert counts == [len(loader)] * 2


# -- 2. the optimizers' non-finite guard --------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda params, data: HALP(params, lr=0.1, T=10, data_loader=data, momentum=0.9, mu=0.5, compile=False),
    lambda params, data: SVRG(params, lr=0.1, T=10, data_loader=data, momentum=0.9, compile=False),
], ids=["halp", "svrg"])
def test_an_optimizer_step_on_a_nan_batch_changes_nothing_and_raises(make):
    data = classification_data("mlp")
    torch.manual_seed(0)
    model = mlp()
    opt = make(model.parameters(), data)
    opt.step(closure_for(model, *data[0]))
    before, weights = optimizer_state(opt), [p.detach().clone() for p in model.parameters()]
    x, y = data[1]
    with pytest.raises(halp_fx.NonFiniteError, match="no state was changed"):
        opt.step(closure_for(model, x * float("nan"), y))
    assert_same(before, optimizer_state(opt))
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))


def test_an_optimizer_with_on_nonfinite_skip_skips_and_counts_the_step():
    data = classification_data("mlp")
    torch.manual_seed(0)
    model = mlp()
    opt = HALP(model.parameters(), lr=0.1, T=10, data_loader=data, momentum=0.9, mu=0.5, compile=False,
               on_nonfinite="skip")
    opt.step(closure_for(model, *data[0]))
    before = optimizer_state(opt)
    x, y = data[1]
    opt.step(closure_for(model, x * float("inf"), y))
    assert opt.nonfinite_steps == 1
    assert_same(before, optimizer_state(opt))
    opt.step(closure_for(model, x, y))
    assert all(torch.isfinite(s["momentum_buffer"]).all() for s in opt.state.values() if "momentum_buffer" in s)


# -- 3. a non-finite full gradient always raises, naming the batch -----------------------------------------

def test_a_nan_batch_in_the_data_loader_raises_naming_it_even_with_skip():
    data = classification_data("mlp")
    x, y = data[2]
    data[2] = (x * float("nan"), y)
    step, _ = make_step(data=data, on_nonfinite="skip")
    with pytest.raises(halp_fx.NonFiniteError, match="batch 2 of the data loader"):
        step(*data[0])
    assert step.recenters == 0


def test_the_optimizer_names_the_nan_batch_of_its_data_loader():
    data = classification_data("mlp")
    data[1] = (data[1][0] * float("nan"), data[1][1])
    torch.manual_seed(0)
    model = mlp()
    opt = HALP(model.parameters(), lr=0.1, T=10, data_loader=data, compile=False, on_nonfinite="skip")
    with pytest.raises(halp_fx.NonFiniteError, match="batch 1 "):
        opt.step(closure_for(model, *data[0]))


# -- 4. lr, mu and what the guard covers --------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e39, 1e-46, 0.0])
def test_an_lr_float32_cannot_hold_is_refused_when_set(value):
    step, _ = make_step()
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        step.lr = value
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        make_step(lr=value)
    with pytest.raises(ValueError, match="mu must be a finite number > 0"):
        step.mu = value


def test_an_lr_over_scale_that_overflows_is_caught_by_the_guard():
    step, data = make_step()
    step(*data[0])
    name = next(iter(step.scale))
    step.scale[name] = torch.tensor(1e-45)   # lr / d overflows float32
    before = snapshot(step)
    with pytest.raises(halp_fx.NonFiniteError):
        step(*data[1])
    assert_same(before, snapshot(step), counted_failures=1)


def test_a_nonfinite_corrected_gradient_with_a_finite_loss_changes_nothing():
    step, data = make_step()
    step(*data[0])
    name = next(iter(step.full_grad))
    step.full_grad[name][0] = float("inf")
    before = snapshot(step)
    with pytest.raises(halp_fx.NonFiniteError, match=r"the loss \(\d"):   # the loss itself is finite
        step(*data[1])
    assert_same(before, snapshot(step), counted_failures=1)


def test_a_batch_that_overflows_batchnorm_statistics_commits_nothing():
    torch.manual_seed(0)
    data = classification_data("cnn")
    step = halp_fx.transform(SmallCNN(), 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1, compile=False)
    step(*data[0])
    before = snapshot(step)
    x, y = data[1]
    with pytest.raises(halp_fx.NonFiniteError):
        step(x * 1e19, y)
    assert_same(before, snapshot(step), counted_failures=1)


# -- 5. buffers reassigned in forward ------------------------------------------------------------------------

class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.register_buffer("ema", torch.zeros(8))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.ema = 0.5 * self.ema + 0.5 * x.mean(0)
        self.calls = self.calls + 1
        return self.fc(x)


def test_buffers_reassigned_in_forward_are_carried_out_of_the_step():
    step, data = make_step(model=Counting())
    for x, y in data[:3]:
        step(x, y)
    assert int(step.buffers["calls"]) == 3   # the pass at W only, as for BatchNorm
    assert step.buffers["ema"].abs().sum() > 0
    model = step.sync_model()
    assert int(model.calls) == 3


def test_a_buffer_reassigned_to_another_shape_is_a_capture_error_naming_it():
    class Growing(Counting):
        def forward(self, x):
            self.ema = x.mean(1, keepdim=True)
            return self.fc(x)
    step, data = make_step(model=Growing())
    with pytest.raises(halp_fx.CaptureError, match="buffer 'ema' is reassigned"):
        step(*data[0])


# -- 6. dropout: one mask for the passes at W and at the anchor ----------------------------------------------

def dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def test_the_first_svrg_step_after_a_recenter_moves_along_the_full_gradient_despite_dropout():
    data = classification_data("mlp")
    model = dropout_model()
    opt = SVRG(model.parameters(), lr=0.1, T=10, data_loader=data, compile=False)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure_for(model, *data[0]))   # recenters (W = A), then u = g(W) - g(A) + G = G
    for p, w in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), w - 0.1 * opt.state[p]["full_grad"], rtol=0, atol=1e-7)


def test_transform_shares_one_dropout_mask_between_the_two_passes():
    step, data = make_step(model=dropout_model())
    step = halp_fx.transform(dropout_model(), None, loss_fn=F.cross_entropy, data_loader=data, lr=0.1,
                             compile=False)
    step(*data[0])
    for name, z in step.offset.items():
        torch.testing.assert_close(z, -0.1 * step.full_grad[name], rtol=0, atol=1e-7)


# -- 7. batch norm and a tiny batch ---------------------------------------------------------------------------

def test_a_tiny_batch_on_a_batchnorm_model_warns_once_to_drop_the_last_batch():
    torch.manual_seed(0)
    data = classification_data("cnn")
    step = halp_fx.transform(SmallCNN(), 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1, compile=False)
    step(*data[0])
    x, y = data[1]
    with pytest.warns(halp_fx.SmallBatchWarning, match="drop_last=True") as record:
        step(x[:1], y[:1])
        step(x[:1], y[:1])
    assert len(record) == 1 and record[0].filename == __file__


def test_a_tiny_batch_without_batchnorm_does_not_warn():
    step, data = make_step()
    step(*data[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", halp_fx.SmallBatchWarning)
        step(data[1][0][:1], data[1][1][:1])


# -- 8. saturation -------------------------------------------------------------------------------------------

def test_saturation_without_a_data_loader_is_still_reported():
    torch.manual_seed(0)
    x, y = classification_data("mlp")[0]
    step = halp_fx.transform(mlp(), 8, loss_fn=F.cross_entropy, lr=1.0, mu=50.0, compile=False)
    with pytest.warns(halp_fx.SaturationWarning):
        for _ in range(300):
            step(x, y)


def test_saturation_counts_offsets_not_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 3))
    step, data = make_step(model=model)
    for x, y in data:
        step(x, y)
    name = "2.bias"
    step.offset[name].fill_(127)   # a tiny tensor, fully saturated
    assert step.stats()[name]["saturated"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", halp_fx.SaturationWarning)
        step.recenter()


def test_the_optimizer_warns_when_its_offsets_saturate():
    data = classification_data("mlp")
    torch.manual_seed(0)
    model = mlp()
    opt = HALP(model.parameters(), lr=1.0, T=len(data), data_loader=data, mu=50.0, compile=False)
    with pytest.warns(halp_fx.SaturationWarning) as record:
        for _ in range(2):
            for x, y in data:
                opt.step(closure_for(model, x, y))
    assert record[0].filename == __file__
    assert max(s["saturated"] for s in opt.stats().values()) > 0.1


# -- 9, 12, 17: compiling ------------------------------------------------------------------------------------

def test_compiled_step_takes_a_batch_of_the_same_shape_with_other_strides_and_logs_its_compile(caplog):
    torch.manual_seed(0)
    data = classification_data("mlp")
    step = halp_fx.transform(mlp(), 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1, compile=True)
    with caplog.at_level(logging.INFO, logger="halp_fx"):
        step(*data[0])
    assert any("compiling the step program" in r.message for r in caplog.records)
    assert any("compiled the step program in" in r.message for r in caplog.records)
    x, y = data[1]
    transposed = x.T.contiguous().T
    assert not transposed.is_contiguous()
    wide = torch.cat([x, x], 1)[:, ::2]
    assert torch.isfinite(step(transposed, y)) and torch.isfinite(step(wide, y))
    assert len(step.programs.entries) == 1


def test_item_in_forward_under_compile_is_a_capture_error_that_says_what_to_do():
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(x) / x.abs().max().item()

    data = classification_data("mlp")
    step = halp_fx.transform(Reads(), 8, loss_fn=F.cross_entropy, data_loader=data, compile=True)
    eager = halp_fx.transform(Reads(), 8, loss_fn=F.cross_entropy, data_loader=data, compile=False)
    if TORCH_VERSION < (2, 2):   # torch 2.1's make_fx cannot trace .item() at all
        with pytest.raises(halp_fx.CaptureError, match=r"reads a tensor's value into Python \(\.item\(\)"):
            eager(*data[0])
        return
    with pytest.raises(halp_fx.CaptureError, match=r"\.item\(\).*compile=False"):
        step(*data[0])
    assert torch.isfinite(eager(*data[0]))


# -- 10. a bad first batch ------------------------------------------------------------------------------------

def test_a_bad_first_batch_does_not_lock_the_step():
    step, data = make_step()
    x, y = data[0]
    with pytest.raises(RuntimeError, match="dtype"):
        step(x.long(), y)
    before = step.state_dict()
    assert torch.isfinite(step(x, y))
    assert step.steps_since_recenter == 1 and step.nonfinite_steps == 0
    assert not torch.equal(step.state_dict()["0.weight.offset"], before["0.weight.offset"])


# -- 11. dtypes and devices the transform does not train ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_a_model_that_is_not_float32_is_refused_naming_parameter_dtype_and_fix(dtype):
    with pytest.raises(TypeError, match=rf"parameter '0.weight' of the model has dtype {dtype}.*model.float\(\)"):
        halp_fx.transform(mlp().to(dtype), 8)


def test_a_meta_device_model_is_refused_at_transform():
    with pytest.raises(ValueError, match="meta device.*Materialize"):
        halp_fx.transform(mlp().to("meta"), 8)


# -- 13. many optimizers in one process ----------------------------------------------------------------------

def test_many_compiled_optimizers_each_keep_their_own_compiled_update():
    import torch._dynamo
    limits = {"cache_size_limit": 2}
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        limits["accumulated_cache_size_limit"] = 2
    updates = []
    with torch._dynamo.config.patch(**limits):
        for width in (3, 4, 5):   # one more shape than one shared code object may hold
            runs = []
            for compile in (True, False):
                torch.manual_seed(0)
                model = nn.Linear(width, 2)
                data = [(torch.randn(4, width), torch.randint(0, 2, (4,)))]
                opt = HALP(model.parameters(), lr=0.1, T=5, data_loader=data, mu=0.5, biased=True, compile=compile)
                for _ in range(3):
                    opt.step(closure_for(model, *data[0]))
                runs.append([p.detach().clone() for p in model.parameters()])
                updates.append(opt._inner_steps)
            # The compiled update ran (no fallback, no cache-limit failure) and computed the eager update's weights.
            for compiled, eager in zip(*runs):
                torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
    compiled_updates = updates[0::2]
    assert len({id(u) for u in compiled_updates}) == 3 and all(u is not halp_inner_steps for u in compiled_updates)


# -- 14. many batch shapes -----------------------------------------------------------------------------------

def test_many_batch_shapes_warn_once_and_keep_a_bounded_cache():
    step, data = make_step(data=classification_data("mlp", samples=64, batch=32))
    x, y = data[0]
    with pytest.warns(halp_fx.ShapeWarning, match="drop_last=True") as record:
        for size in range(2, 14):
            step(x[:size], y[:size])
    assert len(record) == 1
    assert len(step.programs.entries) <= 8


# -- 15. a one-shot iterable -----------------------------------------------------------------------------------

class OneShot:
    """Iterable once, with a length: nothing may be read from it before the first recenter."""

    def __init__(self, batches):
        self.batches, self.used = batches, False

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        assert not self.used, "iterated twice"
        self.used = True
        return iter(self.batches)


def test_transform_reads_nothing_from_the_data_loader_before_the_first_step():
    data = classification_data("mlp")
    step, _ = make_step(data=OneShot(data), T=100)
    step(*data[0])
    reference, _ = make_step(data=data, T=100)
    reference(*data[0])
    assert all(torch.equal(step.full_grad[n], reference.full_grad[n]) for n in step.full_grad)


# -- 16. state dicts --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, words", [
    ("lr", float("nan"), "lr must be a finite number > 0"), ("rounding_counter", "abc", "'rounding_counter' must be an int"),
    ("steps_since_recenter", -5, "'steps_since_recenter' must be an int >= 0"),
    ("recenters", 1.5, "'recenters' must be an int"),
])
def test_a_state_dict_with_a_bad_counter_or_lr_is_refused_and_changes_nothing(key, value, words):
    step, data = make_step()
    step(*data[0])
    state, before = step.state_dict(), snapshot(step)
    state[key] = value
    with pytest.raises(ValueError, match=words):
        step.load_state_dict(state)
    assert_same(before, snapshot(step))


# -- the architecture's promises --------------------------------------------------------------------------------

def test_a_pass_list_without_svrg_correction_names_the_missing_pass():
    step, data = make_step()
    step(*data[0])
    passes = [halp_fx.passes.DequantizeWeightsPass(8), halp_fx.passes.OffsetUpdatePass(8, "nearest", 0.0, 0.0),
              halp_fx.passes.NonfiniteGuardPass()]
    with pytest.raises(halp_fx.PassError, match="pass offset_update needs svrg_correction"):
        halp_fx.passes.run_passes(step.graphs["captured"], passes)


def test_a_pass_that_breaks_its_guarantee_is_named_before_any_step_runs():
    class ForgetfulOffsetUpdate(halp_fx.passes.OffsetUpdatePass):
        def call(self, gm):   # promises an update per tensor, makes none
            return PassResult(gm, False)

    step, data = make_step()
    step(*data[0])
    passes = halp_fx.passes.halp_passes(8, "nearest", 0.0, 0.0)
    passes = [ForgetfulOffsetUpdate(8, "nearest", 0.0, 0.0) if p.name == "offset_update" else p for p in passes]
    with pytest.raises(halp_fx.PassError, match=r"pass offset_update guarantees a update node for every trainable "
                                                r"tensor, and the graph it made has none for \['0.bias', '0.weight'"):
        halp_fx.passes.run_passes(step.graphs["captured"], passes)


def test_every_pass_states_what_it_needs_and_what_it_guarantees():
    passes = halp_fx.passes.halp_passes(8, "stochastic", 0.9, 1e-4, arithmetic="int8", anchor_precision="bf16",
                                        group="g", world_size=2)
    assert all(p.guarantees for p in passes)
    assert all(p.needs for p in passes if p.name != "anchor_constants")


def test_the_recenter_runs_the_captured_graph_itself():
    step, data = make_step()
    step(*data[0])
    entry = step.programs.first
    assert entry.full_gradient.gm is step.graphs["captured"]


def test_the_module_gets_its_weights_back_from_sync_model_and_refuses_to_run_without():
    step, data = make_step()
    model = step.model
    step(*data[0])
    with pytest.raises(RuntimeError, match="sync_model"):
        model(data[0][0])
    step.sync_model()
    assert model(data[0][0]).shape == (8, 3)
    step(*data[1])   # releases again, and captures of new shapes still work
    assert torch.isfinite(step(data[1][0][:5], data[1][1][:5]))
    with pytest.raises(ValueError, match="held by another halp_fx step"):
        halp_fx.transform(model, 8)


def test_passes_is_the_top_level_folder_installed_as_halp_fx_passes():
    assert halp_fx.passes.__file__ == os.path.join(ROOT, "passes", "__init__.py")
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert '"halp_fx.passes" = "passes"' in pyproject


def test_a_checkout_whose_passes_resolve_to_another_installation_says_which_to_install(tmp_path):
    # A second checkout beside the installed one: its halp_fx would run with the installed checkout's passes.
    subprocess.run(["cp", "-r", os.path.join(ROOT, "halp_fx"), os.path.join(ROOT, "passes"),
                    os.path.join(ROOT, "pyproject.toml"), str(tmp_path)], check=True)
    out = subprocess.run([sys.executable, "-c", "import halp_fx"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert f"halp_fx is imported from {tmp_path} but halp_fx.passes from {os.path.join(ROOT, 'passes')}" in out.stderr
    assert f"pip install -e {tmp_path}" in out.stderr


def test_a_checkout_imported_without_installing_says_to_install_it(tmp_path):
    subprocess.run(["cp", "-r", os.path.join(ROOT, "halp_fx"), str(tmp_path)], check=True)
    # No installed halp_fx to fall back on: drop the editable install's finder, as on a machine without it.
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
            "import halp_fx")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "ImportError: halp_fx.passes is the top-level passes/ folder" in out.stderr
    assert "pip install -e ." in out.stderr
