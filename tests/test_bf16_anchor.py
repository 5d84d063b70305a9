"""The bf16 anchor pass (``anchor_precision="bf16"``) and the anchor constants computed once per recenter."""
import re

import pytest
import torch
import torch.nn.functional as F

import halp_fx
from halp_fx import bf16_anchor
from models import classification_data, mlp


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
    assert "G bf16" in step.explain() or "M bf16" in step.explain()


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


def test_where_bf16_does_not_pay_the_anchor_stays_float32_and_explain_says_why(monkeypatch):
    monkeypatch.setattr(bf16_anchor, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
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
