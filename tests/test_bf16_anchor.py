"""The bf16 anchor pass (``anchor_precision="bf16"``) and the anchor constants computed once per recenter."""
import re

import pytest
import torch
import torch.nn.functional as F

import halp_fx
from halp_fx import bf16_anchor, centered_int8
from halp_fx.roles import Role, role_of
from models import classification_data, mlp

BF16_UNIT_ROUNDOFF = 2.0 ** -8


@pytest.fixture
def low_precision_everywhere(monkeypatch):
    """int8 and bf16 products even where they do not pay (this CPU may lack VNNI or AVX512-BF16)."""
    monkeypatch.setenv("HALP_FX_INT8_PRODUCTS", "always")


def make_step(anchor_precision="bf16", arithmetic="int8", **options):
    torch.manual_seed(0)
    data = classification_data("mlp")
    options = {"loss_fn": F.cross_entropy, "data_loader": data, "lr": 0.1, "mu": 0.5, "compile": False,
               "rounding": "nearest", **options}
    return halp_fx.transform(mlp(), 8, arithmetic=arithmetic, anchor_precision=anchor_precision, **options), data


def test_the_anchor_products_under_centered_ones_take_bf16_operands(low_precision_everywhere):
    step, data = make_step()
    step(*data[0])
    code = list(step.graphs.values())[-1].code
    # The anchor weight is cast once per recenter (an anchor constant), then viewed as the product needs it.
    assert "t_to_bf16_anchor_p0_weight = torch.ops.aten.t.default(anchor_constant_to_bf16_anchor_p0_weight)" in code
    assert "halp_fx_bf16_anchor_addmm(anchor_p0_bias, to_bf16_batch_0, t_to_bf16_anchor_p0_weight)" in code
    assert "torch.ops.aten.mm.default" not in code and "torch.ops.aten.addmm.default" not in code
    assert "anchor products under centered products take bf16 operands" in step.explain()
    assert re.search(r"matrix work of the step: anchor: [0-9.]+ [kMG ]*bf16; W: [0-9.]+ [kMG ]*int8", step.explain())


def test_the_full_gradient_stays_float32(low_precision_everywhere):
    step, data = make_step()
    step(*data[0])
    captured = step.graphs["captured"].code
    assert "bf16" not in captured and "bfloat16" not in captured


def test_right_after_a_recenter_a_bf16_anchor_step_moves_the_offsets_as_float32_halp(low_precision_everywhere):
    """At a recenter every difference is zero, so the direction is G exactly: the bf16 anchor changes the loss it
    reports (by bf16's rounding), never the step."""
    bf16, data = make_step(T=1)
    fp32, _ = make_step("fp32", arithmetic="fp32", T=1)
    for x, y in data:
        torch.testing.assert_close(bf16(x, y), fp32(x, y), rtol=2e-2, atol=0)
        assert all(torch.equal(bf16.offset[n], fp32.offset[n]) for n in fp32.offset)


def test_bf16_anchor_training_follows_float32_halp_at_every_step(low_precision_everywhere):
    """The anchor's bf16 error cancels in g(W) - g(A) to first order: the run stays beside float32 HALP."""
    bf16, data = make_step(T=6)
    fp32, _ = make_step("fp32", arithmetic="fp32", T=6)
    for epoch in range(4):
        for x, y in data:
            a, b = float(bf16(x, y)), float(fp32(x, y))
            assert abs(a - b) <= 2e-2 * abs(b), (epoch, a, b)
    for n, w in fp32.weights().items():
        assert (bf16.weights()[n] - w).abs().max() <= 0.05 * w.abs().max()


def corrected_gradients(gm, step, offsets, scale, batch):
    """One call of a stage graph (inputs by role: the step's anchors, ``offsets``, one ``scale`` for every tensor,
    a zero full gradient, so the direction is g(W) - g(A) alone): the corrected gradients, flattened."""
    zero = {n: torch.zeros_like(a) for n, a in step.anchor.items()}
    state = {Role.ANCHOR: step.anchor, Role.OFFSET: offsets, Role.SCALE: {n: torch.tensor(scale) for n in offsets},
             Role.FULL_GRAD: zero, Role.BATCH: dict(enumerate(batch))}
    inputs = [state[role][name] for role, name in (role_of(n) for n in gm.graph.nodes if n.op == "placeholder")]
    return torch.cat([g.flatten() for g in gm(*inputs)[1:]])


def test_the_bf16_anchor_error_is_of_order_bf16_rounding_times_the_difference(low_precision_everywhere):
    """x_W is built on the anchor's value (x_A + an int8 correction), so bf16's error in x_A enters both passes and
    cancels in g(W) - g(A): what is left is of order 2^-8 |g(W) - g(A)|, shrinking with W - A and zero at a recenter,
    not the 2^-8 |g(A)| a bf16 gradient alone would have. (A smooth activation: at a ReLU's kink a unit within
    bf16's rounding of zero can switch sides between the passes; the README gives that term.)"""
    torch.manual_seed(0)
    data = classification_data("mlp")
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    step = halp_fx.transform(model, 8, arithmetic="int8", anchor_precision="bf16", loss_fn=F.cross_entropy,
                             data_loader=data, lr=0.1, mu=0.5, compile=False, rounding="nearest")
    step(*data[0])
    stages = step.graphs
    g = torch.Generator().manual_seed(1)
    offsets = {n: torch.randint(-127, 128, a.shape, generator=g, dtype=torch.int8) for n, a in step.anchor.items()}
    errors = {}
    for size in (0.0, 1e-4, 1e-3, 1e-2, 1e-1):   # the largest |W - A| entry
        scale = size / 127
        exact = corrected_gradients(stages["svrg_correction"], step, offsets, scale, data[1])
        fp32_anchor = corrected_gradients(stages["anchor_difference"], step, offsets, scale, data[1])
        bf16 = corrected_gradients(stages["bf16_anchor"], step, offsets, scale, data[1])
        errors[size] = float((bf16 - fp32_anchor).norm())
        assert errors[size] <= 4 * BF16_UNIT_ROUNDOFF * float(exact.norm()), (size, errors[size], exact.norm())
    assert errors[0.0] == 0.0
    assert errors[1e-4] < errors[1e-3] < errors[1e-2] < errors[1e-1]
    gradient = torch.cat([g.flatten() for g in step.full_grad.values()]).norm()
    assert errors[1e-4] <= 0.01 * BF16_UNIT_ROUNDOFF * float(gradient)


def test_where_bf16_does_not_pay_the_anchor_stays_float32_and_explain_says_why(monkeypatch):
    monkeypatch.setattr(centered_int8, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    step, data = make_step()
    step(*data[0])
    assert "no anchor product in bf16: this CPU has no AVX512-BF16/AMX-BF16" in step.explain()
    assert "bf16_anchor_" not in list(step.graphs.values())[-1].code


@pytest.mark.parametrize("arguments, words", [
    ({"anchor_precision": "fp16"}, "anchor_precision must be one of 'fp32', 'bf16'; got 'fp16'"),
    ({"anchor_precision": "bf16", "arithmetic": "fp32"}, "anchor_precision='bf16' needs arithmetic='int8'"),
])
def test_bad_anchor_precision_is_refused_naming_the_allowed_values(arguments, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        halp_fx.transform(mlp(), 8, **arguments)


def test_anchor_constants_follow_every_recenter_and_a_loaded_state(low_precision_everywhere):
    """The quantized and bf16 anchors are computed once per recenter: a step resumed from a state dict (which
    computes them afresh from its anchors) continues exactly as the step that recentered itself."""
    step, data = make_step(T=2, rounding="stochastic")
    for x, y in data[:5]:   # three recenters
        step(x, y)
    torch.manual_seed(1)   # another model, first recentered elsewhere
    resumed = halp_fx.transform(mlp(), 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1, mu=0.5, compile=False,
                                T=2, arithmetic="int8", anchor_precision="bf16")
    resumed(*data[0])
    resumed.load_state_dict(step.state_dict())
    for x, y in data[5:]:
        assert torch.equal(step(x, y), resumed(x, y))
        assert all(torch.equal(step.offset[n], resumed.offset[n]) for n in step.offset)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_a_compiled_int8_step_on_a_bf16_anchor_matches_the_same_graph_run_eagerly(low_precision_everywhere, device):
    """Sizes that CUDA's int8 kernel takes (over 16 rows, multiples of 8) where it can; Inductor compiles the casts,
    the int8 corrections and the update around the same bf16 and int8 products."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 32, generator=g).to(device), torch.randint(0, 8, (32,), generator=g).to(device))
            for _ in range(3)]

    def build(compile):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(device)
        return halp_fx.transform(model, 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1, mu=0.5, T=2,
                                 rounding="nearest", arithmetic="int8", anchor_precision="bf16", compile=compile)
    eager, compiled = build(False), build(True)
    for x, y in data * 2:
        torch.testing.assert_close(compiled(x, y), eager(x, y), rtol=1e-4, atol=1e-5)
    flips = sum(int((compiled.offset[n] != eager.offset[n]).sum()) for n in eager.offset)
    assert flips <= 2
    assert "anchor products under centered products take bf16 operands" in compiled.explain()


def test_explain_names_the_anchor_precision_and_the_forcing_switch(low_precision_everywhere):
    step, data = make_step()
    step(*data[0])
    text = step.explain()
    assert "arithmetic='int8', anchor_precision='bf16'" in text
    assert "forced where int8 may not pay (HALP_FX_INT8_PRODUCTS=always)" in text
    assert "forced where bf16 may not pay (HALP_FX_INT8_PRODUCTS=always)" in text


def test_without_the_switch_explain_does_not_speak_of_forcing(monkeypatch):
    monkeypatch.delenv("HALP_FX_INT8_PRODUCTS", raising=False)
    step, data = make_step()
    step(*data[0])
    assert "forced" not in step.explain()
